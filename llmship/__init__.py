"""llmship: export, validate and gate on-device LLM artifacts. Importing it pulls in no converter."""

__version__ = "0.1.0"
