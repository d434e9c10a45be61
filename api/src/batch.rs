//! Group commit for requests: each caller hands in one item and awaits its own result, while a
//! few worker tasks take every item waiting at that moment and serve them with one statement.
//! Under load this turns thousands of round trips (and commits) a second into a few hundred;
//! alone, an item is served at once, so a quiet server adds no delay.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

type Pending<I, O> = (I, oneshot::Sender<O>);

#[derive(Debug)]
pub struct Batcher<I, O> {
    queue: mpsc::Sender<Pending<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `workers` tasks, each serving up to `max` items per call of `serve`, which must
    /// return one output per input, in order. While one worker waits on the database, the next
    /// gathers what arrives meanwhile.
    pub fn start<F, Fut>(workers: usize, max: usize, serve: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send,
    {
        let (queue, pending) = mpsc::channel::<Pending<I, O>>(4 * max);
        let pending = Arc::new(Mutex::new(pending));
        let serve = Arc::new(serve);
        for _ in 0..workers.max(1) {
            let (pending, serve) = (pending.clone(), serve.clone());
            tokio::spawn(async move {
                let mut group: Vec<Pending<I, O>> = Vec::with_capacity(max);
                loop {
                    if pending.lock().await.recv_many(&mut group, max).await == 0 {
                        break;
                    }
                    let (items, waiting): (Vec<I>, Vec<oneshot::Sender<O>>) = group.drain(..).unzip();
                    let outputs = serve(items).await;
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
        let batcher = Batcher::start(1, 64, move |items: Vec<u32>| {
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
        assert!(calls < 200 && calls >= 200 / 64, "200 items took {calls} calls");
    }
}
