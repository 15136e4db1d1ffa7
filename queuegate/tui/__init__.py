"""`queuegate top`: a live terminal view of a running daemon over its admin socket (Textual)."""
