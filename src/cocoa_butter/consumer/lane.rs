//! A lane: one aggregate's messages, handled one at a time in stream order.
//!
//! The order rule is [`LaneQueue`], kept apart from the lane's I/O (the
//! channel, the handler, the in-progress acks) so it is unit-tested here:
//! messages run in the order they arrived, except that after a nak the
//! lane holds every later message until the nak'd one comes back (it then
//! runs first) or until its wait is over (another replica has it). Public
//! for the micro-bench (`benches/engine.rs`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use futures::future::OptionFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Delivery, Engine, Job, LaneMap};

/// After a nak, the lane waits for this sequence to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwaitRedelivery {
    pub sequence: u64,
    /// The nak's delay plus one ack wait: by then the message went to
    /// another replica, or will come back after ack_wait anyway.
    pub until: Instant,
}

/// Something a lane orders by its stream sequence.
pub trait Sequenced {
    fn sequence(&self) -> u64;
}

impl Sequenced for Delivery {
    fn sequence(&self) -> u64 {
        self.event.stream_sequence
    }
}

impl<T: Sequenced + ?Sized> Sequenced for Box<T> {
    fn sequence(&self) -> u64 {
        (**self).sequence()
    }
}

/// What a lane does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    /// Handle this message now.
    Run(T),
    /// Hold the waiting messages until the awaited one comes back, or
    /// `until` at the latest.
    Hold { until: Instant },
    /// Nothing to do: the lane may close.
    Idle,
}

/// A lane's waiting messages and the redelivery it waits for, if any.
pub struct LaneQueue<T> {
    waiting: VecDeque<T>,
    awaiting: Option<AwaitRedelivery>,
}

impl<T: Sequenced> Default for LaneQueue<T> {
    fn default() -> Self {
        LaneQueue::new()
    }
}

impl<T: Sequenced> LaneQueue<T> {
    pub fn new() -> Self {
        LaneQueue {
            waiting: VecDeque::new(),
            awaiting: None,
        }
    }

    pub fn push(&mut self, item: T) {
        self.waiting.push_back(item);
    }

    /// The messages waiting their turn (each kept alive while it waits).
    pub fn waiting(&self) -> impl Iterator<Item = &T> {
        self.waiting.iter()
    }

    /// Records how the last message settled: `Some` after a nak.
    pub fn settled(&mut self, awaiting: Option<AwaitRedelivery>) {
        self.awaiting = awaiting;
    }

    /// The next step at `now`. On shutdown a lane stops waiting for a
    /// redelivery and drops what it holds (the server redelivers it after
    /// ack_wait).
    pub fn next(&mut self, now: Instant, shutting_down: bool) -> Next<T> {
        if let Some(wait) = self.awaiting {
            if let Some(pos) = self
                .waiting
                .iter()
                .position(|item| item.sequence() == wait.sequence)
                && let Some(item) = self.waiting.remove(pos)
            {
                self.awaiting = None;
                return Next::Run(item);
            }
            if now < wait.until && !shutting_down {
                return Next::Hold { until: wait.until };
            }
            self.awaiting = None;
            if shutting_down {
                self.waiting.clear();
            }
        }
        match self.waiting.pop_front() {
            Some(item) => Next::Run(item),
            None => Next::Idle,
        }
    }
}

impl Engine {
    /// Handles one aggregate's messages in order, then removes itself.
    pub(super) async fn lane(
        self: Arc<Self>,
        aggregate: String,
        mut receiver: mpsc::UnboundedReceiver<Job>,
        lanes: LaneMap,
        intake: CancellationToken,
    ) {
        let mut lane = LaneQueue::new();
        let keepalive = self.settings.consumer.ack_wait / 3;
        loop {
            while let Ok(job) = receiver.try_recv() {
                lane.push(job);
            }
            match lane.next(Instant::now(), intake.is_cancelled()) {
                Next::Run(job) => {
                    let settled = self
                        .process_in_lane(job, &mut lane, &mut receiver, keepalive)
                        .await;
                    lane.settled(settled);
                }
                Next::Hold { until } => {
                    let tick = (Instant::now() + keepalive).min(until);
                    tokio::select! {
                        job = receiver.recv() => if let Some(job) = job { lane.push(job) },
                        _ = tokio::time::sleep_until(tick.into()) => {
                            for job in lane.waiting() {
                                let _ = job.message.ack_with(AckKind::Progress).await;
                            }
                        }
                        _ = intake.cancelled() => {}
                    }
                }
                Next::Idle => {
                    // Leave only when nothing can arrive: the dispatcher
                    // sends under the same lock.
                    let Ok(mut guard) = lanes.lock() else { return };
                    match receiver.try_recv() {
                        Ok(job) => lane.push(job),
                        Err(_) => {
                            guard.remove(&aggregate);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Processes `job` while the lane's later messages wait: they are
    /// taken off the channel and kept alive with in-progress acks, so a
    /// long handler or an input held for NATS does not let them pass
    /// `ack_wait` and come back as redeliveries (each counting toward
    /// `max_deliver`).
    async fn process_in_lane(
        &self,
        job: Job,
        lane: &mut LaneQueue<Job>,
        receiver: &mut mpsc::UnboundedReceiver<Job>,
        keepalive: Duration,
    ) -> Option<AwaitRedelivery> {
        // Boxed: inline, processing (handler, publish, store spans) made
        // the lane future ~12 KiB, copied into every spawned lane task;
        // boxed it is ~2 KiB.
        let mut processing = Box::pin(self.process(job));
        // The keepalive's timer exists only while later messages wait:
        // most lanes hold one message, and a timer per message (registered
        // with the runtime's timer wheel and cancelled) was a cost the
        // profile showed.
        let mut keepalive_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut open = true;
        loop {
            if keepalive_timer.is_none() && lane.waiting().next().is_some() {
                keepalive_timer = Some(Box::pin(tokio::time::sleep(keepalive)));
            }
            tokio::select! {
                settled = &mut processing => return settled,
                job = receiver.recv(), if open => match job {
                    Some(job) => lane.push(job),
                    None => open = false,
                },
                _ = OptionFuture::from(keepalive_timer.as_mut()), if keepalive_timer.is_some() => {
                    for job in lane.waiting() {
                        let _ = job.message.ack_with(AckKind::Progress).await;
                    }
                    keepalive_timer = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Sequenced for u64 {
        fn sequence(&self) -> u64 {
            *self
        }
    }

    fn lane_of(sequences: &[u64]) -> LaneQueue<u64> {
        let mut lane = LaneQueue::new();
        for &sequence in sequences {
            lane.push(sequence);
        }
        lane
    }

    fn drain(lane: &mut LaneQueue<u64>, now: Instant) -> Vec<u64> {
        let mut ran = Vec::new();
        while let Next::Run(sequence) = lane.next(now, false) {
            ran.push(sequence);
        }
        ran
    }

    #[test]
    fn messages_run_in_the_order_they_arrived() {
        let now = Instant::now();
        let mut lane = lane_of(&[3, 5, 9]);
        assert_eq!(drain(&mut lane, now), [3, 5, 9]);
        assert_eq!(lane.next(now, false), Next::Idle);
    }

    #[test]
    fn after_a_nak_later_messages_wait_for_the_redelivery_which_runs_first() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let mut lane = lane_of(&[]);
        lane.push(3);
        assert_eq!(lane.next(now, false), Next::Run(3));
        // 3 was nak'd; 4 and 5 arrive before it comes back.
        lane.settled(Some(AwaitRedelivery { sequence: 3, until }));
        lane.push(4);
        lane.push(5);
        assert_eq!(lane.next(now, false), Next::Hold { until });
        assert_eq!(lane.waiting().copied().collect::<Vec<_>>(), [4, 5]);
        // The redelivery lands behind them and still runs first.
        lane.push(3);
        assert_eq!(lane.next(now, false), Next::Run(3));
        lane.settled(None);
        assert_eq!(drain(&mut lane, now), [4, 5]);
    }

    #[test]
    fn a_redelivery_that_never_comes_back_releases_the_lane_at_its_deadline() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let mut lane = lane_of(&[7, 8]);
        lane.settled(Some(AwaitRedelivery { sequence: 6, until }));
        assert_eq!(
            lane.next(until - Duration::from_millis(1), false),
            Next::Hold { until }
        );
        assert_eq!(drain(&mut lane, until), [7, 8]);
    }

    #[test]
    fn a_second_nak_while_holding_waits_for_the_new_one() {
        let now = Instant::now();
        let first = now + Duration::from_secs(10);
        let second = now + Duration::from_secs(20);
        let mut lane = lane_of(&[2, 3]);
        lane.settled(Some(AwaitRedelivery {
            sequence: 1,
            until: first,
        }));
        lane.push(1);
        assert_eq!(lane.next(now, false), Next::Run(1));
        // 1 was nak'd again.
        lane.settled(Some(AwaitRedelivery {
            sequence: 1,
            until: second,
        }));
        assert_eq!(lane.next(first, false), Next::Hold { until: second });
    }

    #[test]
    fn shutting_down_stops_waiting_and_drops_what_the_lane_holds() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let mut lane = lane_of(&[4, 5]);
        lane.settled(Some(AwaitRedelivery { sequence: 3, until }));
        assert_eq!(lane.next(now, true), Next::Idle);
        assert_eq!(lane.waiting().count(), 0);
    }
}
