#!/usr/bin/env bash
# Two kind clusters meshed by Trellis, installed with the Helm chart as a user would; the
# README's "Kubernetes (kind)" section walks through the same steps.
#
#   integration/kind/kind-mesh.sh [up|check|down|all] [--dry-run]   (default: all = up, then check)
#
#   up     create clusters c1 and c2 (no default CNI, distinct pod and service subnets), build
#          the image and load it into both, build the trellis CLI, `trellis mesh enable --install`
#          both (c1 creates the mesh CA, in its kube-system; c2 inherits it with
#          --ca-from-context), `trellis mesh connect` them, point CoreDNS at Trellis DNS, and
#          wait with `trellis status --wait` until each controller sees its peer, gateways and
#          tunnels healthy
#   check  prove it: pod to pod across the clusters (both ways), a Service exported from c2
#          resolved and reached from c1 by <svc>.<ns>.svc.clusterset.local, then node
#          encryption switched on and off again with `helm upgrade` (routes between c1's nodes
#          move into the tunnel and back, the controller is not restarted, pods keep talking)
#   down   delete both clusters
#
# --dry-run (or TRELLIS_KIND_DRY_RUN=1) prints every command (`+ command args`) instead of
# running it; what a command would print reads as empty, so every check passes.
#
# Needs a machine with Docker, kind (v0.30: Kubernetes 1.34), kubectl, helm (v3.14+ or v4) and
# a Rust toolchain (for the trellis CLI), and network access for the base images. Settings
# (environment): TRELLIS_KIND_PREFIX (cluster name prefix, default "trellis"), TRELLIS_IMAGE
# (repository:tag, default trellis:dev), KIND_NODE_IMAGE (default: kind's own), HELM (default
# helm), TRELLIS (a trellis binary to use instead of building target/release/trellis),
# TRELLIS_SKIP_BUILD=1 (use an image already built).
set -euo pipefail
cd "$(dirname "$0")/../.."

prefix=${TRELLIS_KIND_PREFIX:-trellis}
image=${TRELLIS_IMAGE:-trellis:dev}
helm=${HELM:-helm}
trellis_bin=${TRELLIS:-target/release/trellis}
dry_run=${TRELLIS_KIND_DRY_RUN:-0}
namespace=trellis-system
work=target/kind
clusters=(c1 c2)
# Each cluster's pod and service subnets: distinct, or the controllers refuse each other.
declare -A pod_subnet=([c1]=10.11.0.0/16 [c2]=10.12.0.0/16)
declare -A service_subnet=([c1]=10.111.0.0/16 [c2]=10.112.0.0/16)
# The NodePort each controller's QUIC peering Service listens on (peering.service.nodePort).
peering_port=30743
demo_image=registry.k8s.io/e2e-test-images/agnhost:2.53
client_image=busybox:1.36

# A dry run prints commands on the script's own output (descriptor 3), also from inside $(...).
exec 3>&1

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'kind-mesh: %s\n' "$*" >&2; exit 1; }

# Runs "$@"; in a dry run prints it instead, as `+ command args` (shell-quoted).
run() {
  if [ "$dry_run" = 1 ]; then
    local line
    printf -v line ' %q' "$@"
    printf '+%s\n' "$line" >&3
    return 0
  fi
  command "$@"
}

# Every outside tool goes through run.
docker() { run docker "$@"; }
kind() { run kind "$@"; }
kubectl() { run kubectl "$@"; }
run_helm() { run "$helm" "$@"; }
run_trellis() { run "$trellis_bin" "$@"; }

# Writes stdin to file $1; in a dry run prints it.
write_file() {
  if [ "$dry_run" = 1 ]; then
    { printf '+ cat > %q <<EOF\n' "$1"; cat; printf 'EOF\n'; } >&3
    return 0
  fi
  cat > "$1"
}

kind_name() { echo "$prefix-$1"; }
ctx() { echo "kind-$(kind_name "$1")"; }
k() { local cluster=$1; shift; kubectl --context "$(ctx "$cluster")" "$@"; }

# Whether "$@" succeeds; always, in a dry run (nothing ran to check).
holds() {
  "$@" || [ "$dry_run" = 1 ]
}

# Retries "$@" every 2 s for up to $1 seconds (the first argument); once, in a dry run.
retry() {
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until holds "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 2
  done
}

need_tools() {
  if [ "$dry_run" = 1 ]; then
    say "dry run: printing every command, running none"
    return 0
  fi
  local tool
  for tool in docker kind kubectl "$helm"; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
  done
  if [ -z "${TRELLIS:-}" ]; then
    command -v cargo >/dev/null || die "cargo is not installed (or set TRELLIS to a trellis binary)"
  fi
  command docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info failed)"
}

create_clusters() {
  local cluster args
  run mkdir -p "$work"
  for cluster in "${clusters[@]}"; do
    if kind get clusters 2>/dev/null | grep -qx "$(kind_name "$cluster")"; then
      say "cluster $cluster exists"
      continue
    fi
    say "creating cluster $cluster (pods ${pod_subnet[$cluster]}, services ${service_subnet[$cluster]})"
    write_file "$work/$cluster.kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
  podSubnet: ${pod_subnet[$cluster]}
  serviceSubnet: ${service_subnet[$cluster]}
nodes:
  - role: control-plane
  - role: worker
EOF
    args=(create cluster --name "$(kind_name "$cluster")" --config "$work/$cluster.kind.yaml")
    if [ -n "${KIND_NODE_IMAGE:-}" ]; then
      args+=(--image "$KIND_NODE_IMAGE")
    fi
    # Not --wait: nodes are NotReady until Trellis installs the CNI plugin.
    kind "${args[@]}"
    # Reverse-path filtering off on every node (see helm/trellis/README.md, Limits): trellis0
    # has no address, and Service traffic masqueraded to a node may arrive through it.
    local node
    for node in "$(kind_name "$cluster")-control-plane" "$(kind_name "$cluster")-worker"; do
      docker exec "$node" sysctl -q -w net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
    done
  done
}

build_and_load_image() {
  if [ "${TRELLIS_SKIP_BUILD:-0}" != 1 ]; then
    say "building $image"
    docker build -t "$image" .
  fi
  local cluster
  for cluster in "${clusters[@]}"; do
    say "loading $image into $cluster"
    kind load docker-image "$image" --name "$(kind_name "$cluster")"
  done
}

# The trellis CLI, run here against the kubeconfig contexts kind wrote.
build_trellis() {
  if [ -z "${TRELLIS:-}" ]; then
    say "building the trellis CLI"
    run cargo build --release -p trellis --bin trellis
  fi
}

# `trellis mesh enable --install` in one cluster: namespace, certificate (its pod and service
# ranges read from the cluster), Secret, and the chart; extra arguments follow.
enable_trellis() {
  local cluster=$1; shift
  local repository=${image%:*} tag=${image##*:}
  run_trellis mesh enable --context "$(ctx "$cluster")" --cluster-id "$cluster" --install \
    --helm "$helm" \
    --set image.repository="$repository" --set image.tag="$tag" --set image.pullPolicy=Never \
    --set peering.service.nodePort="$peering_port" \
    "$@"
}

# Adds `clusterset.local:53 { forward . <Trellis DNS> }` to CoreDNS's Corefile once.
patch_coredns() {
  local cluster=$1 dns_ip corefile
  dns_ip=$(k "$cluster" -n "$namespace" get service trellis-dns -o jsonpath='{.spec.clusterIP}')
  corefile=$(k "$cluster" -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}')
  if ! grep -q '^clusterset.local:53' <<<"$corefile"; then
    say "CoreDNS of $cluster forwards clusterset.local to $dns_ip"
    corefile=$(printf '%s\nclusterset.local:53 {\n    errors\n    cache 5\n    forward . %s\n}\n' \
      "$corefile" "$dns_ip")
    k "$cluster" -n kube-system create configmap coredns --from-literal=Corefile="$corefile" \
      --dry-run=client -o yaml | k "$cluster" apply -f -
    k "$cluster" -n kube-system rollout restart deployment coredns
  fi
  k "$cluster" -n kube-system rollout status deployment coredns --timeout 3m
}

up() {
  need_tools
  create_clusters
  build_and_load_image
  build_trellis
  say "enabling c1 (it creates the mesh CA, Secret kube-system/trellis-mesh-ca)"
  enable_trellis c1
  say "enabling c2 with c1's mesh CA"
  enable_trellis c2 --ca-from-context "$(ctx c1)"
  say "connecting c1 and c2"
  run_trellis mesh connect --context "$(ctx c1)" --destination-context "$(ctx c2)" --helm "$helm"
  local cluster
  for cluster in "${clusters[@]}"; do
    say "waiting for $cluster"
    k "$cluster" wait --for=condition=Ready nodes --all --timeout 5m
    patch_coredns "$cluster"
    run_trellis status --context "$(ctx "$cluster")" --wait --timeout 5m
  done
  say "the mesh is up: kubectl --context $(ctx c1) -n $namespace get pods -o wide"
}

# A demo namespace in both clusters (namespace sameness): an echo server exported from c2, an
# echo server on c1's control-plane node, and a client on c1's worker.
deploy_demo() {
  local cluster
  for cluster in "${clusters[@]}"; do
    k "$cluster" create namespace demo --dry-run=client -o yaml | k "$cluster" apply -f -
  done
  k c2 apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
        - name: echo
          image: $demo_image
          args: [netexec, --http-port=8080]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: echo, namespace: demo}
EOF
  k c1 apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: demo}
spec:
  nodeName: $(kind_name c1)-control-plane
  tolerations: [{operator: Exists}]
  containers:
    - name: echo
      image: $demo_image
      args: [netexec, --http-port=8080]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec:
  nodeName: $(kind_name c1)-worker
  containers:
    - name: client
      image: $client_image
      command: [sleep, "86400"]
EOF
  k c2 -n demo rollout status deployment/echo --timeout 3m
  k c1 -n demo wait --for=condition=Ready pod/echo pod/client --timeout 3m
}

# `wget` from c1's client pod; prints the answer (agnhost's /hostname: the serving pod's name).
fetch() {
  k c1 -n demo exec client -- wget -q -T 5 -O - "http://$1/hostname"
}

# Succeeds when c1's client gets the answer $2 from URL host $1.
answers() {
  local got
  got=$(fetch "$1" 2>/dev/null) || return 1
  [ "$got" = "$2" ]
}

# Routes of c1's worker to the control-plane's pod CIDR, as the gateway made them.
worker_route() {
  local cidr
  cidr=$(k c1 get node "$(kind_name c1)-control-plane" -o jsonpath='{.spec.podCIDRs[0]}')
  docker exec "$(kind_name c1)-worker" ip route show "$cidr"
}
route_in_tunnel() { worker_route | grep -q 'dev trellis0'; }
route_plain() { worker_route | grep -q ' via '; }

# Node encryption switched in cluster $1 to $2 (true or false), every other value kept.
encryption() {
  run_helm upgrade trellis helm/trellis --kube-context "$(ctx "$1")" --namespace "$namespace" \
    --reuse-values --set encryption.node="$2" --wait --timeout 5m
}

check() {
  need_tools
  say "deploying the demo"
  deploy_demo
  local c2_pod c2_ip c1_ip controller_before controller_after
  c2_pod=$(k c2 -n demo get pods -l app=echo -o jsonpath='{.items[0].metadata.name}')
  c2_ip=$(k c2 -n demo get pod "$c2_pod" -o jsonpath='{.status.podIP}')
  c1_ip=$(k c1 -n demo get pod echo -o jsonpath='{.status.podIP}')

  say "pod to pod across clusters: c1/client -> c2/$c2_pod ($c2_ip)"
  retry 60 answers "$c2_ip:8080" "$c2_pod" || die "c1 cannot reach c2's pod $c2_ip"
  say "pod to pod across clusters: c2/$c2_pod -> c1/echo ($c1_ip)"
  retry 60 k c2 -n demo exec "$c2_pod" -- /agnhost connect --timeout=5s "$c1_ip:8080" ||
    die "c2 cannot reach c1's pod $c1_ip"

  say "DNS across clusters: echo.demo.svc.clusterset.local from c1"
  retry 90 k c1 -n demo exec client -- nslookup echo.demo.svc.clusterset.local ||
    die "c1 does not resolve echo.demo.svc.clusterset.local"
  retry 60 answers echo.demo.svc.clusterset.local "$c2_pod" ||
    die "c1 does not reach c2's exported service by its clusterset name"

  controller_before=$(k c1 -n "$namespace" get pods -l app.kubernetes.io/component=controller \
    -o jsonpath='{.items[0].metadata.uid}')
  say "node encryption on in c1 (helm upgrade)"
  holds route_plain || die "c1's worker should route the control-plane's pods plainly: $(worker_route)"
  encryption c1 true
  retry 60 route_in_tunnel || die "routes did not move into the tunnel: $(worker_route)"
  retry 30 answers "$c1_ip:8080" echo || die "c1's pods lost each other with encryption on"
  retry 30 answers "$c2_ip:8080" "$c2_pod" || die "c1 lost c2 with encryption on"

  say "node encryption off again"
  encryption c1 false
  retry 60 route_plain || die "routes did not leave the tunnel: $(worker_route)"
  retry 30 answers "$c1_ip:8080" echo || die "c1's pods lost each other with encryption off"
  controller_after=$(k c1 -n "$namespace" get pods -l app.kubernetes.io/component=controller \
    -o jsonpath='{.items[0].metadata.uid}')
  holds [ "$controller_before" = "$controller_after" ] ||
    die "the controller was restarted by the encryption switch"
  if [ "$dry_run" = 1 ]; then
    say "dry run: nothing was checked"
  else
    say "all checks passed"
  fi
}

down() {
  local cluster
  for cluster in "${clusters[@]}"; do
    kind delete cluster --name "$(kind_name "$cluster")"
  done
}

action=all
for arg in "$@"; do
  case $arg in
    --dry-run) dry_run=1 ;;
    up|check|down|all) action=$arg ;;
    *) die "usage: $0 [up|check|down|all] [--dry-run]" ;;
  esac
done

case $action in
  up) up ;;
  check) check ;;
  down) down ;;
  all) up; check ;;
esac
