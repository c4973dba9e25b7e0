//! The soak: all four rooms of one binary held at a steady offered load for
//! a fixed time. Passes when every input yielded its outputs (the same
//! number for every input of a room, none dead-lettered) and the resident
//! set after warm-up stayed flat.
//!
//! Long, so ignored by `cargo test`; run it with `scripts/soak.sh` (release
//! build) or `CHOCO_LONG_TESTS=1 scripts/test.sh`. `SOAK_SECONDS`
//! (default 300) and `SOAK_RATE` (inputs per room per second, default
//! 50) size it.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use choco_factory::cocoa_butter::EventEnvelope;
use common::workload::{ROOMS, RoomCase, median, resident_kib};
use common::*;
use futures::future::try_join_all;
use std::future::IntoFuture;

/// Memory may grow this much from the end of warm-up to the end of the run
/// (allocator slack and metric series), and no more.
const RSS_GROWTH_ALLOWED: f64 = 1.15;
const RSS_SLACK_MIB: f64 = 4.0;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_mib(pid: u32) -> f64 {
    resident_kib(pid, "VmRSS").expect("resident set") as f64 / 1024.0
}

/// Input `i` of a room; its correlation id, which the outputs carry, names it.
fn input(case: &RoomCase, i: u64) -> EventEnvelope {
    let name = format!("soak-{}-{i}", case.name);
    case.input(&name, name.clone(), "soak")
}

#[tokio::test]
#[ignore = "long: scripts/soak.sh"]
async fn four_rooms_hold_a_steady_load_with_flat_memory_and_no_loss() {
    let seconds = setting("SOAK_SECONDS", 300);
    let rate = setting("SOAK_RATE", 50);
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let mut env: Vec<(String, String)> = Vec::new();
    for case in ROOMS {
        env.extend(room_env(&nats.url(), &case.name.to_uppercase()));
    }
    let factory = Factory::start_with(env, &["serve"]).await;
    wait_until(Duration::from_secs(30), || async {
        factory.logs_containing("\"room ready\"").len() >= ROOMS.len()
    })
    .await;
    let pid = factory.child.id().expect("running");

    // Every 100 ms, a tenth of a second's inputs for each room, published
    // concurrently and acknowledged by the stream before the next tick.
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = rate.div_ceil(10);
    let mut published = 0u64;
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        let mut acks = Vec::new();
        for case in ROOMS {
            for i in published..published + per_tick {
                let event = input(case, i);
                let subject = format!("choco.events.{}.{}", case.domain, case.action);
                let message = PublishMessage::build()
                    .payload(event.encode().into())
                    .message_id(&event.event_id);
                acks.push(
                    js.send_publish(subject, message)
                        .await
                        .expect("publish")
                        .into_future(),
                );
            }
        }
        try_join_all(acks).await.expect("every input stored");
        published += per_tick;
        if started.elapsed() >= next_sample {
            samples.push((started.elapsed().as_secs_f64(), rss_mib(pid)));
            next_sample += Duration::from_secs(5);
        }
    }
    let offered = published as f64 / started.elapsed().as_secs_f64();
    eprintln!("published {published} inputs per room, {offered:.1}/s per room");

    // Every input of every room yields its outputs; count them by the
    // input's correlation id (outputs carry it).
    let mut report = Vec::new();
    for case in ROOMS {
        let stream = format!("choco:events:{}", case.domain);
        let input_type = format!("{}.{}", case.domain, case.action);
        let mut per_input: HashMap<String, usize> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            per_input.clear();
            for message in read_all(&js, &stream, &format!("choco.events.{}.>", case.domain)).await
            {
                let envelope = message.envelope();
                if envelope.event_type != input_type {
                    *per_input.entry(envelope.correlation_id).or_default() += 1;
                }
            }
            if per_input.len() as u64 >= published || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(
            per_input.len() as u64,
            published,
            "{}: every input yields outputs",
            case.name
        );
        let mut counts: Vec<usize> = per_input.values().copied().collect();
        counts.sort_unstable();
        counts.dedup();
        assert_eq!(
            counts,
            [case.outputs],
            "{}: every input yields its outputs, none doubled",
            case.name
        );
        report.push(format!("{} {}×{}", case.name, published, counts[0]));
    }
    assert!(
        read_all(&js, "choco:dlq", "choco.dlq.>").await.is_empty(),
        "nothing dead-lettered"
    );

    // Flat memory: the median of the last fifth of the run against the
    // median of the fifth that follows the first minute's warm-up (or the
    // first fifth, in a run shorter than five minutes).
    samples.push((started.elapsed().as_secs_f64(), rss_mib(pid)));
    let fifth = (samples.len() / 5).max(1);
    let warm = samples
        .iter()
        .position(|(t, _)| *t >= 60.0)
        .filter(|&i| i + fifth < samples.len() - fifth)
        .unwrap_or(0);
    let rss = |range: &[(f64, f64)]| median(&range.iter().map(|s| s.1).collect::<Vec<_>>());
    let after_warmup = rss(&samples[warm..warm + fifth]);
    let at_end = rss(&samples[samples.len() - fifth..]);
    let peak = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    for (t, mib) in samples.iter().step_by(12) {
        eprintln!("  {t:>6.0} s  {mib:.1} MiB");
    }
    eprintln!(
        "soak: {seconds} s at {offered:.1} inputs/s per room; outputs per input: {}; \
         resident set after warm-up {after_warmup:.1} MiB, at the end {at_end:.1} MiB, peak {peak:.1} MiB",
        report.join(", ")
    );
    assert!(
        at_end <= after_warmup * RSS_GROWTH_ALLOWED + RSS_SLACK_MIB,
        "memory grew: {after_warmup:.1} MiB after warm-up, {at_end:.1} MiB at the end"
    );
}
