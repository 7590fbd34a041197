# Shared body of the sbatch scripts in this folder: environment, launch, resume, requeue.
# Sourced by a script that has set:
#   RUN_DIR      run folder (checkpoints/, tensorboard/, STOP)
#   MRPT_VENV    environment with megatron-rpt installed (its console scripts on PATH)
#   MRPT_ENTRY   the training program: mrpt-pretrain (default) or mrpt-rpt
#   TRAIN_ITERS  the run's --train-iters (to tell a finished run from an interrupted one)
#   ARGS         array: the program's flags (with --save/--load "$RUN_DIR/checkpoints")
#   SRUN_ARGS    array: srun options of the training step (tasks per node, cpus per task, ...)
# then calls `mrpt_gpu_env` (GPU clusters) and `mrpt_run`, which exits with the step's status.

mrpt_gpu_env() {
    # Megatron-Core: one CUDA work queue, so communication kernels start in the order they are
    # issued (required for TP/SP overlap; kept for the usual Megatron setting).
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    # MoE token counts change every step: expandable segments keep the allocator from fragmenting.
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    # NCCL. Bootstrap interface: exclude loopback/docker (or name the fabric's, e.g. ib0 / bond0).
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}      # INFO on a first run shows the transports (NVLS, IB, rails)
    # Site-specific InfiniBand settings (ask your admins; NCCL auto-detects the HCAs otherwise):
    # export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7   # one NIC per GPU
    # export NCCL_IB_SL=1             # service level / QoS lane of the fabric
    # export NCCL_IB_TIMEOUT=22       # IB verbs timeout exponent (4.096 us x 2^N); raise on large fabrics
    # export NCCL_IB_GID_INDEX=3      # RoCE only
    # PyTorch NCCL watchdog: on a collective error or timeout abort the communicators and end the
    # process (so srun --kill-on-bad-exit ends the step instead of hanging until the time limit),
    # and dump the last collectives of every rank (flight recorder) to find the rank that diverged.
    # Recent torch reads TORCH_FR_*, older releases the TORCH_NCCL_* names: both are set.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    export TORCH_NCCL_DUMP_ON_TIMEOUT=1
    export TORCH_FR_BUFFER_SIZE=2000 TORCH_NCCL_TRACE_BUFFER_SIZE=2000
    export TORCH_FR_DUMP_TEMP_FILE="$RUN_DIR/nccl_trace_rank_" TORCH_NCCL_DEBUG_INFO_TEMP_FILE="$RUN_DIR/nccl_trace_rank_"
    # Do not let NCCL keep tensors alive through recordStream (as Megatron-LM's DeepSeek-V3 sbatch does).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=1
    # Transformer Engine: leave SMs free for NCCL kernels that overlap norm kernels (grad reduce,
    # all-to-all); a tuning knob, measure before keeping it.
    # export NVTE_FWD_LAYERNORM_SM_MARGIN=16
    # export NVTE_BWD_LAYERNORM_SM_MARGIN=16
    # Triton kernels (the generalized loss) compile into a node-local cache, not a shared file system.
    export TRITON_CACHE_DIR=/tmp/triton-cache-${SLURM_JOB_ID}
}

mrpt_run() {
    source "$MRPT_VENV/bin/activate"
    local entry=${MRPT_ENTRY:-mrpt-pretrain}
    command -v "$entry" >/dev/null || { echo "$entry not found in $MRPT_VENV" >&2; exit 1; }
    mkdir -p "$RUN_DIR/checkpoints" "$RUN_DIR/tensorboard"
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
    export PYTHONUNBUFFERED=1   # log lines reach the job's output file as they are printed
    # MASTER_ADDR / MASTER_PORT: not set here. megatron_rpt/distributed.py takes rank, world size and
    # local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR = first host of
    # SLURM_STEP_NODELIST (rank 0's node under block distribution) and MASTER_PORT = 20000 + job id
    # % 20000 (the same after a requeue, different for concurrent jobs). Exported values would win.

    local ckpt="$RUN_DIR/checkpoints"
    last_iteration() { cat "$ckpt/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0; }
    local start_iter
    start_iter=$(last_iteration)
    echo "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s)" \
         "(${SLURM_JOB_NODELIST}), resuming from iteration ${start_iter} of ${TRAIN_ITERS}"

    # Preemption / scancel / scontrol requeue send SIGTERM to this shell too: stay alive while the
    # ranks (which got it as well) finish their step and save.
    GOT_TERM=0
    trap 'GOT_TERM=1; echo "batch shell: SIGTERM, waiting for the ranks to save"' TERM

    # The program is the task itself (no shell wrapper), so the signals reach Python's handler.
    # --kill-on-bad-exit: one failed rank ends the step instead of leaving the others in a collective.
    srun --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" "$entry" "${ARGS[@]}" &
    local srun_pid=$! rc=0
    while :; do
        wait "$srun_pid"; rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break   # wait was interrupted by the trap: wait again
    done

    local end_iter
    end_iter=$(last_iteration)
    echo "srun exited with ${rc}; latest checkpoint: iteration ${end_iter}"
    # Requeue after a clean exit that made progress but did not finish (the SIGUSR1 time-limit
    # path). Not after a crash (look at the log first), not on SIGTERM (Slurm requeues preempted
    # jobs itself; scancel means stop), not when RUN_DIR/STOP exists.
    if [[ -e "$RUN_DIR/STOP" ]]; then
        echo "$RUN_DIR/STOP exists: not requeueing"
    elif (( rc == 0 && GOT_TERM == 0 && end_iter > start_iter && end_iter < TRAIN_ITERS )); then
        echo "requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    exit "$rc"
}
