"""Fine-tuning the chat model on dialogues: data checks, LoRA / full / QLoRA training with transformers' Trainer,
evaluation against the base model, and export of a merged model.

    python -m finetune train --config finetune/configs/sample.yaml
    python -m finetune evaluate --model runs/sample --data runs/sample/eval.jsonl --limit 20
    python -m finetune export runs/sample --merge --output runs/sample-merged

Conversations are tokenised by `chatbot.chat_format.render_conversation`, which serving shares, so a tuned
model is trained on exactly the format it is served with. This package imports `chatbot`, never the reverse.
"""
