"""Chat memory: what a chat said before, recalled for each turn, so the upstream context stays small."""
