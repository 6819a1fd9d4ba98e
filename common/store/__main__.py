"""`python -m common.store` prints the Redis key map that docs/architecture.md carries."""
from common.store.keys import key_map_markdown

print(key_map_markdown(), end="")
