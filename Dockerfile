# syntax=docker/dockerfile:1
# Build: docker build -t choco-factory .
# Run:   docker run --rm -e CHOCO_NATS__URL=nats://nats:4222 \
#          -v "$PWD/conf:/etc/choco-factory/conf:ro" \
#          -e CHOCO_CONFIG=/etc/choco-factory/conf/factory.toml \
#          -p 8086-8089:8086-8089 -p 7076-7079:7076-7079 -p 9101-9104:9101-9104 choco-factory
# One room per container: append `serve --rooms conch`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# Cargo checks every declared target exists, benches included.
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY rooms.toml rooms.toml
# The same command and lock file as `cargo build --release` anywhere else.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
# A fixed numeric uid/gid, so volume permissions and Kubernetes'
# runAsNonRoot can rely on it.
RUN groupadd --system --gid 10001 choco \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin choco
# The system's trusted roots, for tls:// NATS and an https:// OTLP
# collector: Debian's bundle from the build stage, where
# ca-certificates is installed (no package manager run in this stage).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/target/release/choco-factory /usr/local/bin/choco-factory
COPY rooms.toml /etc/choco-factory/rooms.toml
COPY config /etc/choco-factory/config
# Site configuration (factory.toml, keys, credentials) is mounted here;
# CHOCO_CONFIG names the file, for `serve` and the health check alike.
RUN mkdir /etc/choco-factory/conf
VOLUME ["/etc/choco-factory/conf"]
WORKDIR /etc/choco-factory
# In a container the rooms listen on every interface; logs are JSON lines.
ENV CHOCO_BIND=0.0.0.0 \
    CHOCO_LOG__FORMAT=json
USER 10001:10001
EXPOSE 8086 8087 8088 8089 7076 7077 7078 7079 9101 9102 9103 9104
# Alive = every enabled room's metrics port answers /healthz. Liveness, not
# readiness: a process waiting for NATS is doing the right thing, and an
# orchestrator acting on "unhealthy" would kill it for that. Readiness
# (`health` without --live, or /readyz) is for load balancers. The binary
# asks the ports itself, no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/choco-factory", "health", "--live", "--timeout", "2s"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/choco-factory"]
CMD ["serve"]
