#!/usr/bin/env bash
# Multi-node DeepSpeed training for asrflow, two ways:
#
#  A) hostfile (the DeepSpeed launcher ssh-es into every host):
#       infra/deepspeed/launch_multinode.sh hostfile infra/deepspeed/hostfile.example [--set k=v ...]
#  B) torchrun rendezvous (run the same command on every node, e.g. one pod per node):
#       NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=trainer-0.asrflow:29400 \
#         infra/deepspeed/launch_multinode.sh torchrun [--set k=v ...]
#
# Both run the train step's distributed entry point (model_code.ds_launch) with the prod
# profile; rank 0 writes the step result and publishes the step output atomically.
set -euo pipefail
mode="${1:?usage: launch_multinode.sh hostfile FILE | torchrun}"; shift
PROFILE="${ASRFLOW_PROFILE:-prod}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
case "$mode" in
  hostfile)
    hostfile="${1:?hostfile path}"; shift
    exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
      --module pipeline_tasks.train_entry --profile "$PROFILE" "$@"
    ;;
  torchrun)
    exec python -m torch.distributed.run \
      --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "$GPUS_PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:?}" --rdzv_id "${RDZV_ID:-asrflow-train}" \
      -m pipeline_tasks.train_entry --profile "$PROFILE" "$@"
    ;;
  *) echo "unknown mode $mode" >&2; exit 2;;
esac
