//! Group commit for requests: each caller hands in one item and awaits its own result, while a
//! few worker tasks take every item waiting at that moment and serve them with one statement.
//! Under load this turns thousands of round trips (and commits) a second into a few hundred;
//! alone, an item is served at once, so a quiet server adds no delay.
//!
//! How long the items that arrive while a statement is in flight wait for it is the `Overlap`:
//! - `Overlap::Immediate`: another worker serves them at once, and commits overlap.
//! - `Overlap::After(d)`: they wait for it and share the next statement (one commit, one WAL
//!   flush, for all of them), unless it has been in flight for `d` already. A statement that
//!   stalls (one that merges a GIN index's pending list, or waits on a lock) then holds back
//!   only its own items, not every one that arrives after them: the next worker takes those.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio::time::Instant;

type Pending<I, O> = (I, oneshot::Sender<O>);

/// When a worker starts a statement while another's is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// At once: statements (and their commits) overlap freely.
    Immediate,
    /// Only once every statement in flight has run this long.
    After(Duration),
}

#[derive(Debug)]
pub struct Batcher<I, O> {
    queue: mpsc::Sender<Pending<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

/// When each worker's statement in flight started (`None`: the worker is not serving), and a
/// signal when one ends.
#[derive(Debug)]
struct InFlight {
    started: std::sync::Mutex<Vec<Option<Instant>>>,
    ended: Notify,
}

impl InFlight {
    /// How long worker `me` must still hold its group under `overlap`: until the youngest other
    /// statement in flight is `d` old. `None`: it may start now.
    fn hold(&self, me: usize, overlap: Overlap) -> Option<Duration> {
        let Overlap::After(d) = overlap else { return None };
        let started = self.started.lock().expect("in-flight table");
        let youngest = started.iter().enumerate().filter(|(w, _)| *w != me).filter_map(|(_, s)| *s).max()?;
        d.checked_sub(youngest.elapsed()).filter(|left| !left.is_zero())
    }

    fn mark(&self, worker: usize, started: Option<Instant>) {
        self.started.lock().expect("in-flight table")[worker] = started;
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `workers` tasks, each serving up to `max` items per call of `serve`, which must
    /// return one output per input, in order. While one worker waits on the database, the next
    /// gathers what arrives meanwhile, and starts on it as `overlap` says.
    pub fn start<F, Fut>(workers: usize, max: usize, overlap: Overlap, serve: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send,
    {
        let workers = workers.max(1);
        let (queue, pending) = mpsc::channel::<Pending<I, O>>(4 * max);
        let pending = Arc::new(Mutex::new(pending));
        let serve = Arc::new(serve);
        let in_flight = Arc::new(InFlight { started: std::sync::Mutex::new(vec![None; workers]), ended: Notify::new() });
        for me in 0..workers {
            let (pending, serve, in_flight) = (pending.clone(), serve.clone(), in_flight.clone());
            tokio::spawn(async move {
                let mut group: Vec<Pending<I, O>> = Vec::with_capacity(max);
                loop {
                    let mut gathering = pending.lock().await;
                    if gathering.recv_many(&mut group, max).await == 0 {
                        break;
                    }
                    loop {
                        // Registered before the check, so an end between the two is not missed.
                        let ended = in_flight.ended.notified();
                        tokio::pin!(ended);
                        ended.as_mut().enable();
                        let Some(left) = in_flight.hold(me, overlap) else { break };
                        tokio::select! {
                            _ = ended => {}
                            _ = tokio::time::sleep(left) => {}
                        }
                    }
                    // What arrived while the group was held joins it.
                    while group.len() < max {
                        match gathering.try_recv() {
                            Ok(item) => group.push(item),
                            Err(_) => break,
                        }
                    }
                    drop(gathering);
                    let (items, waiting): (Vec<I>, Vec<oneshot::Sender<O>>) = group.drain(..).unzip();
                    in_flight.mark(me, Some(Instant::now()));
                    let outputs = serve(items).await;
                    in_flight.mark(me, None);
                    in_flight.ended.notify_waiters();
                    debug_assert_eq!(outputs.len(), waiting.len());
                    for (done, output) in waiting.into_iter().zip(outputs) {
                        let _ = done.send(output);
                    }
                }
            });
        }
        Batcher { queue }
    }

    /// Serves one item with the others waiting; `None` if the workers are gone (or `serve`
    /// returned fewer outputs than inputs, which is a bug).
    pub async fn submit(&self, item: I) -> Option<O> {
        let (done, output) = oneshot::channel();
        self.queue.send((item, done)).await.ok()?;
        output.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_caller_gets_its_own_output_and_waiting_items_share_a_call() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let batcher = Batcher::start(1, 64, Overlap::Immediate, move |items: Vec<u32>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                items.into_iter().map(|i| i * 10).collect::<Vec<u32>>()
            }
        });
        let results = futures::future::join_all((0..200u32).map(|i| {
            let b = batcher.clone();
            async move { (i, b.submit(i).await) }
        }))
        .await;
        for (i, out) in results {
            assert_eq!(out, Some(i * 10));
        }
        let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
        assert!((200 / 64..200).contains(&calls), "200 items took {calls} calls");
    }

    /// Serves each group after `took(items)` of (virtual) time, recording how many groups were
    /// in flight at once; returns the batcher and the most in flight.
    fn timed(workers: usize, overlap: Overlap, took: fn(&[u32]) -> u64) -> (Batcher<u32, Instant>, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = most.clone();
        let batcher = Batcher::start(workers, 64, overlap, move |items: Vec<u32>| {
            let (now, most) = (now.clone(), most.clone());
            async move {
                most.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(took(&items))).await;
                now.fetch_sub(1, SeqCst);
                vec![Instant::now(); items.len()]
            }
        });
        (batcher, seen)
    }

    /// Submits item `i` at `i` ms; returns when each was served, from the start.
    async fn one_per_ms(batcher: &Batcher<u32, Instant>, items: u32) -> Vec<Duration> {
        let start = Instant::now();
        let served = futures::future::join_all((0..items).map(|i| {
            let b = batcher.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(i.into())).await;
                b.submit(i).await.expect("served")
            }
        }))
        .await;
        served.into_iter().map(|at| at - start).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn items_arriving_during_a_short_statement_wait_to_share_the_next() {
        let (held, most) = timed(2, Overlap::After(Duration::from_millis(10)), |_| 3);
        one_per_ms(&held, 50).await;
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 1, "statements overlapped though none ran 10 ms");
        // Without the hold, the second worker starts on them at once.
        let (free, most) = timed(2, Overlap::Immediate, |_| 3);
        one_per_ms(&free, 50).await;
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_statement_holds_back_only_its_own_items() {
        // Item 0's statement stalls for a second; the others take 1 ms.
        let stalls = |items: &[u32]| if items.contains(&0) { 1_000 } else { 1 };
        let (held, most) = timed(2, Overlap::After(Duration::from_millis(10)), stalls);
        let served = one_per_ms(&held, 30).await;
        assert!(served[0] >= Duration::from_secs(1));
        // Items 1-9 waited until the stalled statement had run 10 ms, and no longer.
        for (i, at) in served.iter().enumerate().skip(1) {
            assert!(*at >= Duration::from_millis(10) && *at <= Duration::from_millis(i as u64 + 12), "item {i} served at {at:?}");
        }
        assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 2);
        // One worker: every item waits for the stalled statement.
        let (alone, _) = timed(1, Overlap::After(Duration::from_millis(10)), stalls);
        assert!(one_per_ms(&alone, 30).await.iter().all(|at| *at >= Duration::from_secs(1)));
    }
}
