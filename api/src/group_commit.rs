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

/// When each worker's statement in flight started (`None`: the worker is not serving), and
/// the signals the others wait on: a statement has run its overlap time, or one has ended.
/// The first worker's short statements wake no other task.
#[derive(Debug)]
struct InFlight {
    started: std::sync::Mutex<Vec<Option<Instant>>>,
    overdue: Notify,
    ended: Notify,
}

impl InFlight {
    /// Another statement in flight that has run less than `d`: worker `me`'s group waits for it.
    fn held(&self, me: usize, d: Duration) -> bool {
        let started = self.started.lock().expect("in-flight table");
        started.iter().enumerate().any(|(w, s)| w != me && s.is_some_and(|s| s.elapsed() < d))
    }

    /// Spare worker `me` (not the first) gathers only while every worker before it has a
    /// statement in flight that has run `d`.
    fn engaged(&self, me: usize, d: Duration) -> bool {
        let started = self.started.lock().expect("in-flight table");
        started[..me].iter().all(|s| s.is_some_and(|s| s.elapsed() >= d))
    }

    fn mark(&self, worker: usize, started: Option<Instant>) {
        self.started.lock().expect("in-flight table")[worker] = started;
    }

    /// Waits until `ready()`, asking again after each of the `signals`. Nothing is registered
    /// when it is ready at once, as the first worker's check before each statement mostly is.
    async fn wait(signals: &[&Notify], mut ready: impl FnMut() -> bool) {
        if ready() {
            return;
        }
        loop {
            // Registered before asking, so a signal between the two is not missed.
            let mut waiting: Vec<_> = signals.iter().map(|s| Box::pin(s.notified())).collect();
            for w in &mut waiting {
                w.as_mut().enable();
            }
            if ready() {
                return;
            }
            futures::future::select_all(waiting).await;
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `workers` tasks, each serving up to `max` items per call of `serve` (with the
    /// worker's number, from 0, for what each keeps apart, such as its connection), which must
    /// return one output per input, in order. Under `Overlap::Immediate`, while one worker
    /// waits on the database the next gathers what arrives meanwhile and serves it. Under
    /// `Overlap::After(d)`, the first worker serves everything while its statements take less
    /// than `d`; the second gathers only while the first's statement in flight has run `d`
    /// (the third while both have), and a group waits while another statement in flight has
    /// run less than `d`, to share its successor.
    pub fn start<F, Fut>(workers: usize, max: usize, overlap: Overlap, serve: F) -> Self
    where
        F: Fn(usize, Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send,
    {
        let workers = workers.max(1);
        let (queue, pending) = mpsc::channel::<Pending<I, O>>(4 * max);
        let pending = Arc::new(Mutex::new(pending));
        let serve = Arc::new(serve);
        let in_flight = Arc::new(InFlight { started: std::sync::Mutex::new(vec![None; workers]), overdue: Notify::new(), ended: Notify::new() });
        let after = match overlap {
            Overlap::After(d) => Some(d),
            Overlap::Immediate => None,
        };
        for me in 0..workers {
            let (pending, serve, in_flight) = (pending.clone(), serve.clone(), in_flight.clone());
            tokio::spawn(async move {
                let (overdue, ended) = (&in_flight.overdue, &in_flight.ended);
                let (on_overdue, on_ended, on_either) = ([overdue], [ended], [overdue, ended]);
                let mut group: Vec<Pending<I, O>> = Vec::with_capacity(max);
                loop {
                    let spare = after.filter(|_| me > 0);
                    if let Some(d) = spare {
                        InFlight::wait(&on_overdue, || in_flight.engaged(me, d)).await;
                    }
                    let mut gathering = pending.lock().await;
                    let received = match spare {
                        None => gathering.recv_many(&mut group, max).await,
                        // A spare stops gathering as soon as a worker before it is free again.
                        Some(d) => tokio::select! {
                            n = gathering.recv_many(&mut group, max) => n,
                            _ = InFlight::wait(&on_ended, || !in_flight.engaged(me, d)) => continue,
                        },
                    };
                    if received == 0 {
                        break;
                    }
                    if let Some(d) = after {
                        InFlight::wait(&on_either, || !in_flight.held(me, d)).await;
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
                    let serving = serve(me, items);
                    let outputs = match after {
                        None => serving.await,
                        Some(d) => {
                            tokio::pin!(serving);
                            tokio::select! {
                                outputs = &mut serving => outputs,
                                _ = tokio::time::sleep(d) => {
                                    overdue.notify_waiters();
                                    serving.await
                                }
                            }
                        }
                    };
                    in_flight.mark(me, None);
                    if after.is_some() {
                        ended.notify_waiters();
                    }
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
        let batcher = Batcher::start(1, 64, Overlap::Immediate, move |_, items: Vec<u32>| {
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

    /// What `timed` saw: the most groups in flight at once, and the worker tasks that served.
    #[derive(Default)]
    struct Seen {
        now: usize,
        most: usize,
        workers: std::collections::HashSet<tokio::task::Id>,
    }

    /// Serves each group after `took(items)` of (virtual) time, recording what it saw.
    fn timed(workers: usize, overlap: Overlap, took: fn(&[u32]) -> u64) -> (Batcher<u32, Instant>, Arc<std::sync::Mutex<Seen>>) {
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let shared = seen.clone();
        let batcher = Batcher::start(workers, 64, overlap, move |_, items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                {
                    let mut seen = seen.lock().unwrap();
                    seen.now += 1;
                    seen.most = seen.most.max(seen.now);
                    seen.workers.insert(tokio::task::id());
                }
                tokio::time::sleep(Duration::from_millis(took(&items))).await;
                seen.lock().unwrap().now -= 1;
                vec![Instant::now(); items.len()]
            }
        });
        (batcher, shared)
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
        let (held, seen) = timed(2, Overlap::After(Duration::from_millis(10)), |_| 3);
        one_per_ms(&held, 50).await;
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.most, 1, "statements overlapped though none ran 10 ms");
            assert_eq!(seen.workers.len(), 1, "the spare served though the first worker was never held up");
        }
        // Without the hold, the second worker starts on them at once.
        let (free, seen) = timed(2, Overlap::Immediate, |_| 3);
        one_per_ms(&free, 50).await;
        let seen = seen.lock().unwrap();
        assert_eq!((seen.most, seen.workers.len()), (2, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_statement_holds_back_only_its_own_items() {
        // Item 0's statement stalls for a second; the others take 1 ms.
        let stalls = |items: &[u32]| if items.contains(&0) { 1_000 } else { 1 };
        let (held, seen) = timed(2, Overlap::After(Duration::from_millis(10)), stalls);
        let served = one_per_ms(&held, 30).await;
        assert!(served[0] >= Duration::from_secs(1));
        // Items 1-9 waited until the stalled statement had run 10 ms, and no longer.
        for (i, at) in served.iter().enumerate().skip(1) {
            assert!(*at >= Duration::from_millis(10) && *at <= Duration::from_millis(i as u64 + 12), "item {i} served at {at:?}");
        }
        assert_eq!(seen.lock().unwrap().most, 2);
        // One worker: every item waits for the stalled statement.
        let (alone, _) = timed(1, Overlap::After(Duration::from_millis(10)), stalls);
        assert!(one_per_ms(&alone, 30).await.iter().all(|at| *at >= Duration::from_secs(1)));
    }
}
