# One image with every Trellis binary: trellis (CLI, `trellis cni install`), trellis-cni,
# trellis-gateway, trellis-controller and trellis-dns. The Helm chart (helm/trellis) runs each
# component from it with an explicit command.
#
#   docker build -t trellis:dev .
#
# Not built in this repository's CI (it has no Docker engine); integration/kind/kind-mesh.sh
# builds it on a machine with Docker.

# Build: the workspace's release binaries (the Rust version the workspace is developed with).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p trellis -p trellis-cni -p trellis-gateway -p trellis-controller -p trellis-dns \
 && mkdir /out \
 && cp target/release/trellis target/release/trellis-cni target/release/trellis-gateway \
       target/release/trellis-controller target/release/trellis-dns /out/

# Run: a slim Debian with the same glibc as the build stage. Netlink, TUN, QUIC and the
# Kubernetes API are spoken by the binaries themselves; the node agent loads its nftables
# tables (anti-spoofing, NetworkPolicy) with `nft`.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# Non-root by default (the controller and DNS); the chart runs the node agent as root with
# NET_ADMIN only.
USER 65532:65532
CMD ["trellis", "--help"]
