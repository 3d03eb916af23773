"""Pre-training of the tiny world's MLLM: shapes captioning plus text-only turns, saved as an InternVL -hf folder."""
