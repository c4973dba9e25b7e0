# syntax=docker/dockerfile:1
# Build: docker build -t choco-factory .
# Run:   docker run --rm -e CHOCO_NATS__URL=nats://nats:4222 \
#          -p 8086-8089:8086-8089 -p 7076-7079:7076-7079 -p 9101-9104:9101-9104 choco-factory

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
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home choco
COPY --from=build /src/target/release/choco-factory /usr/local/bin/choco-factory
COPY rooms.toml /etc/choco-factory/rooms.toml
COPY config /etc/choco-factory/config
WORKDIR /etc/choco-factory
# In a container the rooms listen on every interface; logs are JSON lines.
ENV CHOCO_BIND=0.0.0.0 \
    CHOCO_LOG__FORMAT=json
USER choco
EXPOSE 8086 8087 8088 8089 7076 7077 7078 7079 9101 9102 9103 9104
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/choco-factory"]
CMD ["serve"]
