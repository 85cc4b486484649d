#!/usr/bin/env bash
# bash examples/chat_ddk.sh CHAT_CORPUS [WORK]
# Chat distillation on CPU with the tool's own commands: a teacher trained on the chat corpus
# (tokens-only cache, CE on the assistant's tokens), its top-64 chat cache (loss mask:
# assistant tokens only), then one student distilled two ways from that cache: `ddk-cache
# distill` and the Hugging Face Trainer (examples/hf_trainer.py). Make CHAT_CORPUS with
# examples/chat_corpus.py.
set -euo pipefail
CORPUS=$(realpath "${1:?usage: chat_ddk.sh CHAT_CORPUS [WORK]}")
WORK=${2:-/tmp/ddk-chat}
TEACHER_STEPS=${TEACHER_STEPS:-300}  # fewer for a quick try
STEPS=${STEPS:-200}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
cd "$WORK"
# A ChatML template: the tokenizer trained by init-model has none of its own.
cat > chatml.jinja <<'JINJA'
{% for m in messages %}<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}
JINJA
COMMON=(--data "$CORPUS" --chat-template chatml.jinja --seq-len 256 --val-tokens 8192 --backend hf --quiet)

[ -d teacher0 ] || ddk-cache init-model --corpus "$CORPUS" --out teacher0 --vocab-size 4096 --hidden-size 256 --layers 4
ddk-cache build --tokenizer teacher0 --out tokens.zarr --top-k 0 "${COMMON[@]}"
[ -d runs/teacher/final ] || ddk-cache distill --cache tokens.zarr --student teacher0 --out runs/teacher --kd-loss none \
    --mixing natural --max-steps $TEACHER_STEPS --batch-size 8 --lr 2e-3 --warmup-steps 20 --ddk-interval 100 --quiet
ddk-cache build --teacher runs/teacher/final --out cache.zarr --top-k 64 "${COMMON[@]}"
ddk-cache inspect cache.zarr
# The student starts from teacher0's random weights both ways.
ddk-cache distill --cache cache.zarr --student teacher0 --out runs/distill --max-steps $STEPS --ddk-interval 50 --batch-size 8 --quiet
python "$HERE/hf_trainer.py" --cache cache.zarr --student teacher0 --out runs/hf --max-steps $STEPS --batch-size 8 --ddk-every 50
ddk-cache eval --cache cache.zarr --model runs/distill/final
ddk-cache eval --cache cache.zarr --model runs/hf
