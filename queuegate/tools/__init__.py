"""Tools QueueGate runs for the model: OpenAPI tool servers, the execute loop, text-form tool calls."""
