"""bench/serve.py's parts: the model and its tokenizer, the processes it starts, the
workload, the streaming client, the summaries, and the report's serving section."""
