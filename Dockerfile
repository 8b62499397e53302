# Meshline controller image.
#
#   docker build -t ghcr.io/meshline/meshline:0.1.0 --build-arg VERSION=0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Stage 1 builds a release binary; stage 2 is distroless (glibc + libgcc, no
# shell, no package manager) and runs as the unprivileged user 65532, the uid
# the Helm chart's securityContext expects.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# Dependency layer: compile every dependency against stub sources, so that this
# layer is reused until Cargo.toml or Cargo.lock change. Cargo refuses a manifest
# whose declared targets (the binary, the library, every bench) have no source
# file, so the stubs are derived from Cargo.toml by scripts/cargo-target-stubs:
# a new bench never breaks this stage again (tests/dockerfile.rs replays it).
# .cargo/config.toml sets build environment (the bundled SQLite's flags); without
# it here, the application layer would rebuild those dependencies.
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
COPY scripts/cargo-target-stubs scripts/
RUN sh scripts/cargo-target-stubs Cargo.toml > .target-stubs \
    && cargo fetch --locked \
    && cargo build --release --locked --bin meshline \
    && xargs rm -f < .target-stubs \
    && rm -rf .target-stubs \
        target/release/meshline target/release/meshline.d \
        target/release/deps/meshline-* target/release/deps/libmeshline-* \
        target/release/.fingerprint/meshline-*

# Application layer. The stub's fingerprints are gone, so the crate is rebuilt
# whatever the mtimes of the copied sources are.
COPY . .
RUN cargo build --release --locked --bin meshline \
    && install -D -m 0755 target/release/meshline /out/meshline

FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="meshline" \
      org.opencontainers.image.description="Kubernetes operator that turns CRM to ERP syncs into declared, enforced contracts" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Meshline" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/meshline /usr/local/bin/meshline

USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/meshline"]
CMD ["controller"]
