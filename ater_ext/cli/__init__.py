"""Command-line tools: ``ater-train``, ``ater-eval`` and the demo driver."""
