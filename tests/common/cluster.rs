//! A real three-node JetStream cluster on loopback: three nats-server
//! processes, routes between them, a store each. Started and stopped like
//! the single server of `Nats`; a node can be killed, stopped, restarted on
//! its store, and a stream's or consumer's leader asked to step down.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use choco_factory::cocoa_butter::nats_server::{self, ManagedNats};

use super::free_ports;
use super::proxy::Proxy;

pub const NODES: usize = 3;

pub struct Cluster {
    pub nodes: Vec<ManagedNats>,
    _dir: tempfile::TempDir,
    /// With [`Cluster::start_partitionable`]: every route to and from the
    /// third server passes through one of these.
    partition: Vec<Proxy>,
    /// One cluster at a time in a test binary: three servers and the
    /// binary already share two cores.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The server's name in stream and consumer info (`cluster.leader`).
pub fn node_name(index: usize) -> String {
    format!("n{}", index + 1)
}

impl Cluster {
    /// Three servers in one cluster, each with JetStream, ready once an R3
    /// stream can be placed.
    pub async fn start() -> Cluster {
        choco_factory::cocoa_butter::tls::install_default_provider();
        Self::start_with(false, true).await
    }

    /// Like [`Cluster::start`], but the servers write to disk as a
    /// production server does (fsync on JetStream's schedule, durability
    /// from the three copies) rather than before every acknowledgement:
    /// for benches, whose figures should be a deployment's.
    pub async fn start_as_deployed() -> Cluster {
        Self::start_with(false, false).await
    }

    /// Like [`Cluster::start`], with every route of the third server (`n3`)
    /// through a TCP proxy of the harness, so that [`Cluster::cut_off_third`]
    /// partitions it from the other two without killing anything. Servers
    /// gossip no addresses to clients (`no_advertise`), so a client of `n3`
    /// stays on `n3`; `n3` advertises a proxy as its route address, so no
    /// implicit route can bypass the proxies; routes ping every 2 s, so a
    /// silent route is noticed in seconds.
    pub async fn start_partitionable() -> Cluster {
        Self::start_with(true, true).await
    }

    async fn start_with(partitionable: bool, sync_always: bool) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = nats_server::find_binary().expect("nats-server (run scripts/setup.sh)");
        let ports = free_ports::<{ 2 * NODES }>().expect("free ports for the cluster");
        let (route_ports, client_ports) = ports.split_at(NODES);
        let route_to = |port: u16| format!("nats-route://127.0.0.1:{port}");
        let local = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // Proxies of n3's routes: n1 → n3, n2 → n3, n3 → n1, n3 → n2.
        let mut partition = Vec::new();
        if partitionable {
            for target in [2, 2, 0, 1] {
                partition.push(Proxy::start(0, local(route_ports[target])).await);
            }
        }
        let mut nodes = Vec::with_capacity(NODES);
        for index in 0..NODES {
            let routes: Vec<String> = if partitionable {
                match index {
                    0 => vec![route_to(route_ports[1]), route_to(partition[0].addr.port())],
                    1 => vec![route_to(route_ports[0]), route_to(partition[1].addr.port())],
                    _ => vec![
                        route_to(partition[2].addr.port()),
                        route_to(partition[3].addr.port()),
                    ],
                }
            } else {
                (0..NODES)
                    .filter(|&other| other != index)
                    .map(|other| route_to(route_ports[other]))
                    .collect()
            };
            // The partitionable cluster's settings (see start_partitionable).
            let (top, in_cluster) = if !partitionable {
                (String::new(), String::new())
            } else if index == 2 {
                (
                    "ping_interval: \"2s\"\nping_max: 2\n".to_string(),
                    format!(
                        "  no_advertise: true\n  advertise: \"127.0.0.1:{}\"\n",
                        partition[0].addr.port()
                    ),
                )
            } else {
                (
                    "ping_interval: \"2s\"\nping_max: 2\n".to_string(),
                    "  no_advertise: true\n".to_string(),
                )
            };
            // Every message on disk before it is acknowledged (as the fault
            // tests' single server does), and room for the production
            // config's per-stream `max_bytes`: JetStream reserves a stream's
            // limit against the server's store size, which by default is a
            // share of this machine's free disk.
            let sync = if sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            };
            let config = format!(
                "server_name: {name}\n{top}\
                 jetstream {{\n{sync}  max_file_store: 2T\n}}\n\
                 cluster {{\n  name: choco-test\n  listen: 127.0.0.1:{listen}\n  \
                 routes: [{routes}]\n{in_cluster}}}\n",
                name = node_name(index),
                listen = route_ports[index],
                routes = routes.join(", "),
            );
            let store = dir.path().join(node_name(index));
            std::fs::create_dir_all(&store).expect("node dir");
            // The servers start one after another; each waits for its
            // client port only, the cluster forms once all three run.
            let node = ManagedNats::start_configured(
                binary.clone(),
                &store,
                client_ports[index],
                false,
                &config,
            )
            .await
            .expect("cluster node starts");
            nodes.push(node);
        }
        let cluster = Cluster {
            nodes,
            _dir: dir,
            partition,
            _turn: turn,
        };
        // Generous: three servers electing a meta leader on two busy cores.
        cluster.wait_healthy(Duration::from_secs(120)).await;
        cluster
    }

    /// Stops forwarding every route of `n3` (partitionable clusters only):
    /// it runs on, cut off from the majority.
    pub fn cut_off_third(&self) {
        assert!(!self.partition.is_empty(), "start_partitionable");
        self.partition.iter().for_each(Proxy::blackhole);
    }

    pub fn heal_third(&self) {
        self.partition.iter().for_each(Proxy::heal);
    }

    /// Every server, comma-separated, as `nats.url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(ManagedNats::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client that knows every server (and fails over between them).
    pub async fn client(&self) -> (async_nats::Client, jetstream::Context) {
        let urls: Vec<String> = self.nodes.iter().map(ManagedNats::url).collect();
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(urls)
            .await
            .expect("connect to the cluster");
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        (client, js)
    }

    /// Waits until the cluster can place a three-replica stream: its meta
    /// leader is elected and all three servers are its peers.
    pub async fn wait_healthy(&self, limit: Duration) {
        let (_client, js) = self.client().await;
        let deadline = Instant::now() + limit;
        loop {
            let probe = js
                .create_stream(jetstream::stream::Config {
                    name: "cluster-probe".into(),
                    subjects: vec!["cluster.probe".into()],
                    num_replicas: NODES,
                    storage: jetstream::stream::StorageType::Memory,
                    ..Default::default()
                })
                .await;
            if probe.is_ok() && js.delete_stream("cluster-probe").await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy within {limit:?}: {probe:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Which node leads `stream` now (waits for it to have a leader).
    pub async fn stream_leader(&self, js: &jetstream::Context, stream: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut handle) = js.get_stream(stream).await
                && let Ok(info) = handle.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
                && let Some(index) = (0..NODES).find(|&i| node_name(i) == leader)
            {
                return index;
            }
            assert!(Instant::now() < deadline, "{stream} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the leader of `stream` to step down (`$JS.API.STREAM.LEADER.STEPDOWN`).
    pub async fn step_down_stream(&self, client: &async_nats::Client, stream: &str) {
        step_down(client, format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}")).await;
    }

    /// Asks the leader of a consumer to step down.
    pub async fn step_down_consumer(
        &self,
        client: &async_nats::Client,
        stream: &str,
        consumer: &str,
    ) {
        step_down(
            client,
            format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"),
        )
        .await;
    }
}

async fn step_down(client: &async_nats::Client, subject: String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = client.request(subject.clone(), "".into()).await;
        let answer: serde_json::Value = match answer {
            Ok(message) => serde_json::from_slice(&message.payload).unwrap_or_default(),
            Err(err) => serde_json::json!({ "error": err.to_string() }),
        };
        if answer["success"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "{subject} was refused: {answer}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
