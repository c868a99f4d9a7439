#!/usr/bin/env bash
# Multi-node DeepSpeed training for asrflow, two ways:
#
#  A) hostfile (the DeepSpeed launcher ssh-es into every host):
#       infra/deepspeed/launch_multinode.sh hostfile infra/deepspeed/hostfile.example ARGS_JSON
#  B) torchrun rendezvous (run the same command on every node, e.g. one pod per node):
#       NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=trainer-0.asrflow:29400 \
#         infra/deepspeed/launch_multinode.sh torchrun ARGS_JSON
#
# Both run the train step's distributed entry point (model_code.ds_launch) on ARGS_JSON: the
# TrainArgs file the train step writes as <out_dir>/train_args.json when train.world_size > 1
# (every path in it must be on storage all nodes share). Rank 0 writes <out_dir>/result.json.
set -euo pipefail
mode="${1:?usage: launch_multinode.sh hostfile FILE | torchrun}"; shift
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
case "$mode" in
  hostfile)
    hostfile="${1:?hostfile path}"; shift
    exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
      --module model_code.ds_launch --args "${1:?ARGS_JSON}"
    ;;
  torchrun)
    exec python -m torch.distributed.run \
      --nnodes "${NNODES:?}" --node_rank "${NODE_RANK:?}" --nproc_per_node "$GPUS_PER_NODE" \
      --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:?}" --rdzv_id "${RDZV_ID:-asrflow-train}" \
      -m model_code.ds_launch --args "${1:?ARGS_JSON}"
    ;;
  *) echo "unknown mode $mode" >&2; exit 2;;
esac
