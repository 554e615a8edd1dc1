# registryd: build in the Rust image, run on a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p registry-api --bin registryd --bin registryctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/registryd /src/target/release/registryctl /usr/local/bin/
ENV REGISTRY_LISTEN=0.0.0.0:50051 \
    REGISTRY_LOG_FORMAT=json
EXPOSE 50051
USER nobody
ENTRYPOINT ["/usr/local/bin/registryd"]
