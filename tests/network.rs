//! A bad network between the runtime and NATS, made by a TCP proxy of the
//! harness (`common::proxy`): added latency, a throttled link, a
//! blackhole (silent, nothing closed) and a reset. The conch runs behind
//! the proxy while the test's own client publishes a steady load straight
//! to the server; after each fault every input is handled exactly once,
//! nothing is dead-lettered, and the room is ready again. Latency figures
//! are printed (never asserted): the README quotes them.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::steady::{assert_each_write_once, latencies, quantile, steady_writes};
use common::*;

/// A nats-server, a client of the test straight to it, and a proxy to it.
async fn proxied_nats() -> (Nats, async_nats::jetstream::Context, Proxy) {
    let nats = Nats::start().await;
    let (_client, js) = nats.client().await;
    let target = nats
        .url()
        .trim_start_matches("nats://")
        .parse()
        .expect("addr");
    let proxy = Proxy::start(0, target).await;
    (nats, js, proxy)
}

/// The conch connected to NATS through `proxy`, with `extra` settings.
async fn conch_behind(proxy: &Proxy, extra: &[(&str, &str)]) -> Factory {
    let mut env = conch_env(&format!("nats://{}", proxy.addr));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env.push(("CHOCO_NATS__PING_INTERVAL".into(), "1s".into()));
    env.push(("CHOCO_CONSUMER__HEARTBEAT".into(), "1s".into()));
    let factory = Factory::start_with(env, &["serve", "--rooms", "conch"]).await;
    factory.wait_ready().await;
    factory
}

fn report(what: &str, js_latencies: &[Duration]) {
    eprintln!(
        "{what}: {} outputs; latency p50 {:?}, p99 {:?}, max {:?}",
        js_latencies.len(),
        quantile(js_latencies, 0.5),
        quantile(js_latencies, 0.99),
        js_latencies.last().copied().unwrap_or_default()
    );
}

/// Latency and a throttled link are not failures: nothing is lost or
/// doubled, the work just takes longer.
#[tokio::test]
async fn a_slow_or_throttled_link_loses_nothing() {
    const WRITES: usize = 600;
    let (_nats, js, proxy) = proxied_nats().await;
    let _factory = conch_behind(&proxy, &[]).await;

    let load = steady_writes(js.clone(), "slow", WRITES, 100);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.delay(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Well above the load (100 inputs/s of well under 1 KiB each way), so
    // the link is slow, not saturated.
    proxy.throttle(256 * 1024);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.heal();
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    report(
        "50 ms latency, then 256 KiB/s each way",
        &latencies(&js).await,
    );
}

/// A blackhole (the link goes silent, nothing is closed) and a reset: the
/// room is not ready within about three ping intervals of the blackhole,
/// ready again on its own once the link is back, and nothing is lost or
/// doubled across either.
#[tokio::test]
async fn a_blackhole_and_a_reset_make_the_room_not_ready_and_lose_nothing() {
    const WRITES: usize = 800;
    let (_nats, js, proxy) = proxied_nats().await;
    // Messages delivered on the connection that died wait for the ack
    // deadline before JetStream delivers them again: a short one here, so
    // the test (and its latency figure) shows the knob, not the default.
    let factory = conch_behind(&proxy, &[("CHOCO_CONSUMER__ACK_WAIT", "5s")]).await;

    let load = steady_writes(js.clone(), "cut", WRITES, 100);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = Instant::now();
    proxy.blackhole();
    factory.wait_not_ready().await;
    let noticed = cut.elapsed();
    eprintln!("blackhole noticed after {noticed:?} (nats.ping_interval = 1s)");
    assert!(
        noticed < Duration::from_secs(10),
        "a silent link is noticed by the pings, not after minutes: {noticed:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.heal();
    factory.wait_ready().await;
    let healed = cut.elapsed();
    eprintln!("ready again {healed:?} after the blackhole began");

    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.reset();
    load.await.expect("publisher");
    assert_each_write_once(&js, WRITES).await;
    factory.wait_ready().await;
    report(
        "a blackhole, then a reset (consumer.ack_wait = 5s)",
        &latencies(&js).await,
    );
}
