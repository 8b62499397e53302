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

/// A replica killed holding slots gives them back as its next process starts (worker ids are pod names, so
/// the restarted container has the same one): it does not wait out their leases, and nobody else's slots
/// are touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_reclaims_the_slots_its_killed_process_held() {
    use std::time::Duration;

    let fixture = Fixture::postgres();
    let clock = support::ledger_suite::clock();
    let before = fixture.open(clock.clone()).await;
    let other = fixture.open(clock.clone()).await;
    let lease = Duration::from_secs(30);
    let mut held = before
        .acquire_delivery_slots("pod-a", 4, 3, lease)
        .await
        .unwrap();
    held.sort();
    assert_eq!(held, [0, 1, 2]);
    assert_eq!(
        other
            .acquire_delivery_slots("pod-b", 4, 4, lease)
            .await
            .unwrap(),
        [3]
    );
    // pod-a is killed (no release) and its container restarts under the same name.
    drop(before);
    let after = fixture.open(clock.clone()).await;
    assert_eq!(after.reclaim_delivery_slots("pod-a").await.unwrap(), 3);
    let mut again = after
        .acquire_delivery_slots("pod-a", 4, 4, lease)
        .await
        .unwrap();
    again.sort();
    assert_eq!(
        again,
        [0, 1, 2],
        "at once, not after the lease; pod-b keeps 3"
    );
    assert_eq!(
        other
            .renew_delivery_slots("pod-b", &[3], lease)
            .await
            .unwrap(),
        [3]
    );
}
