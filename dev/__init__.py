"""Developer corner: the local stack launcher (`make run`) and the tiny random-weight model builder.

Why apart from common/: nothing a deployed API or worker shares belongs here;
these start processes and build test models. The worker imports the tiny-model
builder only to serve an embedded default when no model is configured.
"""
