//! The flow's delivery concurrency, shared by every replica: a replica holds one of the ledger's delivery
//! slots for each ERP call it has in flight, so `delivery.concurrency: 10` means ten requests at the ERP's
//! account however many replicas run (NetSuite and Odoo count concurrency per account, not per client).
//!
//! It owns the replica's side of the slot leases: taking slots from the ledger in batches, reusing them
//! locally for a short term, renewing their leases while held and giving them back. It does not decide how
//! many records a replica claims or when it calls the ERP (the pipeline does).
//!
//! **Why a term.** Taking and giving back a slot in the ledger for every request would add two round trips to
//! each delivery. A slot is therefore reused for further requests for [`TERM`] after it was taken, then given
//! back, so replicas with work take turns on the slots instead of one keeping them all while it is busy.
//! Slots are leased for [`LEASE`] and renewed while held, so a replica that dies holding some blocks them for
//! at most that long.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::ledger::{Ledger, LedgerError};

/// How long a replica reuses a slot before giving it back.
pub const TERM: Duration = Duration::from_millis(200);
/// The lease on a slot in the ledger.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often idle and used-up slots are given back; leases are renewed every few ticks.
const TICK: Duration = Duration::from_millis(100);
/// Leases are renewed every sixth of their length, so a few failed renewals in a row still keep them.
const RENEW_EVERY_TICKS: u32 = (LEASE.as_millis() / TICK.as_millis() / 6) as u32;
/// The longest wait between two asks for slots while other replicas hold them all.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// This replica's share of the flow's delivery slots.
pub struct SharedSlots {
    ledger: Arc<dyn Ledger>,
    holder: String,
    limit: u32,
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Default)]
struct State {
    /// Held, not in use, with when each was taken from the ledger.
    free: Vec<(i64, Instant)>,
    /// Held and in use.
    in_use: HashSet<i64>,
    /// Held, term over: given back at the next ask or tick.
    spent: Vec<i64>,
    /// Callers waiting for a slot.
    waiting: usize,
    /// A caller is asking the ledger for slots.
    asking: bool,
}

impl State {
    fn held(&self) -> usize {
        self.free.len() + self.in_use.len() + self.spent.len()
    }
}

/// One slot in use; dropping it ends the use (after the ERP answered).
pub struct SlotGuard {
    slots: Arc<SharedSlots>,
    slot: i64,
    taken: Instant,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut state = lock(&self.slots.state);
        state.in_use.remove(&self.slot);
        if self.taken.elapsed() < TERM {
            state.free.push((self.slot, self.taken));
        } else {
            state.spent.push(self.slot);
        }
        drop(state);
        self.slots.freed.notify_one();
    }
}

/// Clears `asking` if the caller that asks the ledger for slots is dropped before its answer.
struct AskingGuard<'a> {
    slots: &'a SharedSlots,
    armed: bool,
}

impl Drop for AskingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.slots.state).asking = false;
            // The slots given back in the dropped call lapse with their leases; the waiters ask afresh.
            self.slots.freed.notify_waiters();
        }
    }
}

impl SharedSlots {
    pub fn new(ledger: Arc<dyn Ledger>, holder: &str, limit: u32) -> Arc<SharedSlots> {
        Arc::new(SharedSlots {
            ledger,
            holder: holder.to_string(),
            limit: limit.max(1),
            state: Mutex::default(),
            freed: Notify::new(),
        })
    }

    /// Slots this replica holds right now (in use or not).
    pub fn held(&self) -> usize {
        lock(&self.state).held()
    }

    /// Waits for a slot: one this replica holds, or more taken from the ledger in one call for every caller
    /// waiting. An error is the ledger's; the caller gives its record back rather than call the ERP unslotted.
    pub async fn acquire(self: &Arc<Self>) -> Result<SlotGuard, LedgerError> {
        let mut wait = Duration::from_millis(2);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let ask = {
                let mut state = lock(&self.state);
                if let Some((slot, taken)) = state.free.pop() {
                    state.in_use.insert(slot);
                    return Ok(SlotGuard {
                        slots: self.clone(),
                        slot,
                        taken,
                    });
                }
                if state.asking {
                    None
                } else {
                    state.asking = true;
                    let spent = std::mem::take(&mut state.spent);
                    let room = (self.limit as usize).saturating_sub(state.held());
                    Some((spent, (state.waiting + 1).min(room)))
                }
            };
            let Some((spent, want)) = ask else {
                // Another caller is asking for all of us; wait for its answer or a slot coming free.
                lock(&self.state).waiting += 1;
                let _ = tokio::time::timeout(MAX_WAIT, freed).await;
                lock(&self.state).waiting -= 1;
                continue;
            };
            // The pipeline gives up on a slot after a while (a timeout drops this future): whoever asks must
            // clear `asking` even then, or every later caller would wait for an answer that never comes.
            let mut asking = AskingGuard {
                slots: self,
                armed: true,
            };
            let answer = self.ask(spent, want).await;
            let got = {
                let mut state = lock(&self.state);
                state.asking = false;
                asking.armed = false;
                match &answer {
                    Ok(slots) => {
                        let now = Instant::now();
                        state.free.extend(slots.iter().map(|s| (*s, now)));
                        slots.len()
                    }
                    Err(_) => 0,
                }
            };
            self.freed.notify_waiters();
            answer?;
            if got == 0 {
                // Every slot is in use, here or at another replica: wait for one to come free here, or ask
                // the ledger again a little later.
                let _ = tokio::time::timeout(wait, freed).await;
                wait = (wait * 2).min(MAX_WAIT);
            }
        }
    }

    /// Gives back `spent` slots, then takes up to `want`. The slots given back are not taken again in the same
    /// call, so a replica with work never keeps a slot past its term when another replica waits for it.
    async fn ask(&self, spent: Vec<i64>, want: usize) -> Result<Vec<i64>, LedgerError> {
        if !spent.is_empty()
            && let Err(e) = self
                .ledger
                .release_delivery_slots(&self.holder, &spent)
                .await
        {
            // They stay leased to us until their lease runs out; we no longer count them.
            tracing::warn!(error = %e, slots = ?spent, "could not give delivery slots back; they expire");
        }
        if want == 0 {
            return Ok(Vec::new());
        }
        self.ledger
            .acquire_delivery_slots(&self.holder, self.limit, want, LEASE)
            .await
    }

    /// Gives back idle and spent slots every tick and renews the leases of the rest, until `shutdown`; then
    /// gives back everything not in use.
    pub async fn keep(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticks: u32 = 0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            ticks = ticks.wrapping_add(1);
            let back = {
                let mut state = lock(&self.state);
                let mut back = std::mem::take(&mut state.spent);
                // A slot no one here has used for a whole term is of more use to another replica.
                state.free.retain(|(slot, taken)| {
                    let keep = taken.elapsed() < TERM;
                    if !keep {
                        back.push(*slot);
                    }
                    keep
                });
                back
            };
            if !back.is_empty()
                && let Err(e) = self
                    .ledger
                    .release_delivery_slots(&self.holder, &back)
                    .await
            {
                tracing::warn!(error = %e, "could not give delivery slots back; they expire");
            }
            if ticks.is_multiple_of(RENEW_EVERY_TICKS) {
                self.renew().await;
            }
        }
        let back = {
            let mut state = lock(&self.state);
            let mut back = std::mem::take(&mut state.spent);
            back.extend(state.free.drain(..).map(|(slot, _)| slot));
            back
        };
        if let Err(e) = self
            .ledger
            .release_delivery_slots(&self.holder, &back)
            .await
        {
            tracing::warn!(error = %e, "could not give delivery slots back at shutdown; they expire");
        }
    }

    async fn renew(&self) {
        let held: Vec<i64> = {
            let state = lock(&self.state);
            state
                .free
                .iter()
                .map(|(slot, _)| *slot)
                .chain(state.in_use.iter().copied())
                .chain(state.spent.iter().copied())
                .collect()
        };
        match self
            .ledger
            .renew_delivery_slots(&self.holder, &held, LEASE)
            .await
        {
            Ok(kept) => {
                let kept: HashSet<i64> = kept.into_iter().collect();
                let mut state = lock(&self.state);
                // A slot whose lease lapsed (the ledger was unreachable for a whole lease) may be another
                // replica's now: stop using it.
                state.free.retain(|(slot, _)| kept.contains(slot));
                state.spent.retain(|slot| kept.contains(slot));
                let lost = state.in_use.iter().filter(|s| !kept.contains(s)).count();
                if lost > 0 {
                    tracing::warn!(
                        lost,
                        "delivery slots in use lapsed; the ERP may briefly see more than the limit"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not renew delivery slots; retrying"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
