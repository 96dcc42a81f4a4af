# Sourced by every job script: go to the repository, load the site's modules, activate the venv.
# Scheduler directives in the job scripts are comments, so each script also runs as `bash jobs/<script> key=value ...`.

# Slurm runs a copy of the batch script from its spool folder: submit from the repository root.
cd "${SLURM_SUBMIT_DIR:-${LS_SUBCWD:-$(pwd)}}" || exit 1
[ -f code/train.py ] || { echo "error: run or submit job scripts from the repository root" >&2; exit 1; }

# Modules of the cluster's software stack, where there is one. Adapt the names to your site:
# SR_MODULES="stack/2024-06 python_cuda/3.11.6" is Euler's Slurm stack today (the default below). An LSF site
# sets its own: the handout's 2022 stack has Python 3.8, too old for the pinned torch.
if [ -n "${SR_MODULES-stack/2024-06 python_cuda/3.11.6}" ] && command -v module >/dev/null 2>&1; then
    module load ${SR_MODULES-stack/2024-06 python_cuda/3.11.6}
fi

# The venv of this repository (`make venv`), or one named by SR_VENV (e.g. ~/mathfound22_ex6_env).
VENV="${SR_VENV:-.venv}"
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
else
    echo "warning: no venv at $VENV (make venv, or set SR_VENV); using $(command -v python3)" >&2
fi
PYTHON="$(command -v python || command -v python3)"

# A GPU job trains on the GPU or stops at once with one line (no CUDA, or a GPU this torch build has no
# kernels for) instead of training on the node's CPU cores until its time limit. Set SR_DEVICE=auto or
# pass device=cpu to run a job script without a GPU; arguments given to the script come later and win.
DEVICE_ARG="device=${SR_DEVICE:-cuda}"

# Run a training command in the background and pass the scheduler's warning signal (USR1) on to it with
# $FORWARD (default: USR1 to the command): the training saves a checkpoint and exits with status 75,
# "resume me". Sets $status to the command's exit status and $signalled to 1 if USR1 came.
run_forwarding_usr1() {
    "$@" &
    local child=$!
    signalled=0
    trap 'signalled=1; echo "USR1 received: asking the training to checkpoint and stop" >&2; '"${FORWARD:-kill -USR1 $child}" USR1
    while true; do
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break  # wait returns early (status > 128) when a trapped signal arrives
    done
    trap - USR1
}

# Under Slurm, put an interrupted job back in the queue; its next start continues with resume=auto.
requeue_if_interrupted() {
    if { [ "$status" -eq 75 ] || [ "$signalled" -eq 1 ]; } && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "requeueing job $SLURM_JOB_ID to continue the training"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}
