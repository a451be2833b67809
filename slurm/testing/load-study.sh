#!/usr/bin/env bash
# Load and tracking measurements on the multi-host namespace cluster (issue 19; a measurement, not a CI
# test). Runs one study of N tiny trials (DiT-XXS/4 on the digits, a grid over train.seed, no FID, no
# validation) with `ditscale slurm submit --nodes HOSTS`, waits for the job and reports: its state and
# wall time, whether every trial has exactly one FINISHED run (none duplicated, none left RUNNING), the
# trials' start-up (`startup_s`) p50/p95, the time of each metrics logging call (MlflowClient.log_batch,
# timed in every process by a sitecustomize hook on PYTHONPATH) and the "database is locked" errors.
#
#   slurm/testing/load-study.sh [--trials 50] [--steps 5] [--log-every 5] [--tracking sqlite|server]
#                               [--hosts 3] [--cpus 2] [--out DIR]
#
#   --tracking sqlite   every trial writes to <out>/mlflow.db directly (the shared-filesystem default)
#   --tracking server   `--mlflow-server`: the job's MLflow server on the head host, store <out>/mlflow-server/
#   --cpus C            CPUs per host for Ray (trials run 1 CPU each: HOSTS x C side by side)
#   --out DIR           the submit folder (default: a new private folder, mktemp -d
#                       /tmp/ditscale-load-<tracking>-XXXXXX); kept afterwards
#
# The cluster: slurm/testing/start-netns-cluster.sh $DITSCALE_NETNS_STATE (a state folder that script
# made; when unset, a new cluster with a new folder; DITSCALE_NETNS_NAME/NET/HOSTS as for that script,
# defaults here dsload / 198.18.250 / --hosts) is started if it is not up, and left running for the next
# measurement: the script prints the `export DITSCALE_NETNS_STATE=...` that reuses it and the
# stop-netns-cluster.sh command that stops it. The digits shards are packed into the submit folder
# unless DITSCALE_LOAD_DATA names a folder of them. Needs root (see that script).
#
# Examples (issue 19, items 4 and 6):
#   slurm/testing/load-study.sh --trials 6 --steps 30 --log-every 1 --tracking sqlite
#   slurm/testing/load-study.sh --trials 6 --steps 30 --log-every 1 --tracking server
#   slurm/testing/load-study.sh --trials 50 --steps 5 --tracking server
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
trials=50 steps=5 log_every=5 tracking=sqlite hosts=3 cpus=2 out=""
while [ $# -gt 0 ]; do
    case $1 in
        --trials) trials=$2; shift 2 ;;
        --steps) steps=$2; shift 2 ;;
        --log-every) log_every=$2; shift 2 ;;
        --tracking) tracking=$2; shift 2 ;;
        --hosts) hosts=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "load-study: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case $tracking in sqlite|server) ;; *) echo "load-study: --tracking sqlite|server" >&2; exit 2 ;; esac
command -v ditscale >/dev/null || { echo "load-study: activate ditscale's virtualenv first" >&2; exit 2; }

export DITSCALE_NETNS_NAME=${DITSCALE_NETNS_NAME:-dsload} DITSCALE_NETNS_NET=${DITSCALE_NETNS_NET:-198.18.250}
export DITSCALE_NETNS_HOSTS=${DITSCALE_NETNS_HOSTS:-$hosts}
# export DITSCALE_NETNS_STATE=... and SLURM_CONF=..., both printf %q-quoted by the start script
eval "$("$here/start-netns-cluster.sh" "${DITSCALE_NETNS_STATE:-}")"
echo "cluster: export DITSCALE_NETNS_STATE=$DITSCALE_NETNS_STATE (reuse it); stop: $here/stop-netns-cluster.sh $DITSCALE_NETNS_STATE"

# A predictable folder in /tmp could be made first by another user, and this runs as root.
if [ -z "$out" ]; then out=$(mktemp -d "/tmp/ditscale-load-$tracking-XXXXXX"); fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$out"
data=${DITSCALE_LOAD_DATA:-$out/digits}
[ -f "$data/dataset.json" ] || ditscale data pack digits "$data" --image-size 16 --shard-size 500 >/dev/null

seeds=$(seq -s, 0 $((trials - 1)))
cat > study.yaml <<EOF
name: load-$tracking
data: {shards: "$data/train-{000000..000003}.tar", val_shards: "$data/val-000000.tar", image_size: 16, channels: 1, num_workers: 0}
model: {family: dit, size: XXS, patch: 4}
train: {steps: $steps, batch_size: 32, lr: 1.0e-3, precision: fp32, zero_stage: 2, log_every: $log_every,
        checkpoint_every: $steps, ema_decay: 0.99}
eval: {fid_samples: 0, val_batches: 0}
resources: {workers_per_trial: 1, cpus_per_worker: 1}
tracking: {system_metrics: false}
grid: {train.seed: [$seeds]}
EOF

# Every Python process of the job (driver, Ray workers on every host) times MlflowClient.log_batch.
mkdir -p hook calls
cat > hook/sitecustomize.py <<'EOF'
import importlib.abc, importlib.util, os, socket, sys, time

_OUT = os.environ.get("DITSCALE_LOGTIME_DIR")


def _patch(module):
    cls = module.MlflowClient
    original = cls.log_batch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        t0, outcome = time.perf_counter(), "ok"
        try:
            return original(self, run_id, metrics, params, tags, *args, **kwargs)
        except Exception as err:
            outcome = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            raise
        finally:
            line = f"{time.time():.3f}\t{time.perf_counter() - t0:.4f}\t{len(metrics or ())}\t{outcome}\n"
            with open(os.path.join(_OUT, f"{socket.gethostname()}-{os.getpid()}.tsv"), "a") as f:
                f.write(line)

    cls.log_batch = log_batch


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "mlflow.tracking.client":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _OUT:
    sys.meta_path.insert(0, _Finder())
EOF
export PYTHONPATH="$out/hook${PYTHONPATH:+:$PYTHONPATH}" DITSCALE_LOGTIME_DIR="$out/calls"
unset MLFLOW_TRACKING_URI

server=()
[ "$tracking" = server ] && server=(--mlflow-server --mlflow-insecure)   # the test cluster's private network
t0=$(date +%s.%N)
sub=$(ditscale slurm submit study.yaml --nodes "$hosts" --cpus-per-task "$cpus" "${server[@]}")
echo "$sub" | head -2
job=$(echo "$sub" | sed -n 's/^Submitted job \([0-9]*\).*/\1/p')
state=""
while :; do
    state=$(scontrol -o show job "$job" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case $state in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) break ;; esac
    sleep 2
done
t1=$(date +%s.%N)
log="$out/runs/load-$tracking/slurm/slurm-$job.out"
store="sqlite:///$out/mlflow.db"
[ "$tracking" = server ] && store="sqlite:///$out/mlflow-server/mlflow.db"
unset PYTHONPATH DITSCALE_LOGTIME_DIR

python - "$job" "$state" "$t0" "$t1" "$log" "$store" "load-$tracking" "$trials" "$steps" "$log_every" "$out/calls" <<'EOF' | tee "$out/summary.txt"
import glob, statistics, sys

job, state, t0, t1, log, store, name, trials, steps, every, calls = sys.argv[1:]
trials, steps, every = int(trials), int(steps), int(every)
from mlflow.tracking import MlflowClient


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))] if values else float("nan")


text = open(log, errors="replace").read()
print(f"job {job}: {state}; wall {float(t1) - float(t0):.0f} s from submit to the end; "
      f"{trials} trials x {steps} steps, log_every {every}; store {store}")
print(f"'database is locked' in the job log: {text.count('database is locked')}; "
      f"tracebacks: {text.count('Traceback')}; trial retries/errors (Tune): {text.count('errored') + text.count('ERROR')}")
c = MlflowClient(store)
exp = c.get_experiment_by_name(name)
runs = c.search_runs([exp.experiment_id], filter_string="tags.trial_id != ''", max_results=5000) if exp else []
ids = [r.data.tags["trial_id"] for r in runs]
statuses = {}
for r in runs:
    statuses[r.info.status] = statuses.get(r.info.status, 0) + 1
print(f"trial runs: {len(runs)} for {len(set(ids))} trial ids (duplicates {len(ids) - len(set(ids))}); "
      f"statuses {statuses}; running left {statuses.get('RUNNING', 0)}")
startups, full = [], 0
for r in runs:
    hist = c.get_metric_history(r.info.run_id, "startup_s")
    if hist:
        startups.append(hist[0].value)
    loss = c.get_metric_history(r.info.run_id, "loss")
    full += len(loss) == steps // every
print(f"runs with every loss step logged: {full}/{len(runs)}")
if startups:
    print(f"startup_s: p50 {pct(startups, 50):.1f} s, p95 {pct(startups, 95):.1f} s, max {max(startups):.1f} s "
          f"(n={len(startups)})")
rows = [line.rstrip("\n").split("\t") for f in glob.glob(f"{calls}/*.tsv") for line in open(f)]
metric_calls = [r for r in rows if int(r[2]) > 0]
durations = [float(r[1]) for r in metric_calls]
errors = [r[3] for r in metric_calls if r[3] != "ok"]
locked = sum("locked" in e for e in errors)
if durations:
    print(f"metric log_batch calls: {len(durations)}; p50 {1000 * pct(durations, 50):.0f} ms, "
          f"p95 {1000 * pct(durations, 95):.0f} ms, max {1000 * max(durations):.0f} ms, "
          f"total {sum(durations):.1f} s; failed {len(errors)} (database is locked: {locked})")
    for e in sorted(set(errors))[:5]:
        print(f"  error: {e}")
EOF
echo "folder: $out  (log $log)"
