//! The ledger's promises, kept by the PostgreSQL backend against a real server that the harness starts from
//! the machine's binaries (several replicas of one flow share this backend).

mod support;

use support::ledger_suite::{Fixture, ledger_suite};

ledger_suite!(Fixture::postgres);

/// The flow's delivery slots are shared by replicas: never more holders than the limit, a slot given back
/// is free for another replica, and a dead replica's slots come free when their lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_slots_are_shared_between_replicas_and_a_dead_holders_expire() {
    use std::time::Duration;

    let fixture = Fixture::postgres();
    let clock = support::ledger_suite::clock();
    let a = fixture.open(clock.clone()).await;
    let b = fixture.open(clock.clone()).await;
    assert!(a.shares_delivery_slots());
    let lease = Duration::from_secs(30);

    let mut held_a = a
        .acquire_delivery_slots("replica-a", 3, 5, lease)
        .await
        .unwrap();
    held_a.sort();
    assert_eq!(
        held_a,
        [0, 1, 2],
        "at most the limit, however many are wanted"
    );
    assert!(
        b.acquire_delivery_slots("replica-b", 3, 3, lease)
            .await
            .unwrap()
            .is_empty(),
        "replica b gets none while a holds them all"
    );

    a.release_delivery_slots("replica-a", &[1]).await.unwrap();
    assert_eq!(
        b.acquire_delivery_slots("replica-b", 3, 3, lease)
            .await
            .unwrap(),
        [1],
        "a slot given back goes to the replica that asks"
    );
    // Releasing a slot one no longer holds changes nothing.
    a.release_delivery_slots("replica-a", &[1]).await.unwrap();
    assert!(
        a.acquire_delivery_slots("replica-a", 3, 3, lease)
            .await
            .unwrap()
            .is_empty()
    );

    // A lowered limit hands out no slot above it.
    a.release_delivery_slots("replica-a", &[0, 2])
        .await
        .unwrap();
    assert_eq!(
        a.acquire_delivery_slots("replica-a", 1, 3, lease)
            .await
            .unwrap(),
        [0]
    );

    // Replica b keeps its slot alive; replica a dies holding slot 0, whose lease then runs out.
    clock.advance(Duration::from_secs(20));
    assert_eq!(
        b.renew_delivery_slots("replica-b", &[1], lease)
            .await
            .unwrap(),
        [1]
    );
    clock.advance(Duration::from_secs(15));
    let mut taken = b
        .acquire_delivery_slots("replica-b", 3, 3, lease)
        .await
        .unwrap();
    taken.sort();
    assert_eq!(
        taken,
        [0, 2],
        "a's lapsed slot and the free one; b's own renewed slot is not re-taken"
    );
    assert!(
        a.renew_delivery_slots("replica-a", &[0], lease)
            .await
            .unwrap()
            .is_empty(),
        "the dead holder learns it lost the slot"
    );
}
