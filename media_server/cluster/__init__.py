"""Facecast as a cluster on NATS: several media nodes and lip-sync/render workers sharing one broker.

- ``link.py``: the connection (reconnecting by itself, credentials and TLS), subjects and buckets
  namespaced by the cluster's name.
- ``registry.py``: every process publishes its load to a key-value bucket; ``ClusterView`` reads them.
- ``placement.py``: which node takes a new session; ``forwarding.py``: offers and session APIs
  reach the node that owns the session, over request-reply.
- ``lipsync.py``: a lip-sync engine that renders on a leased worker (``lipsync_service.py``, run by
  ``facecast worker``), and locally whenever a worker does not answer in time.
- ``avatars.py``, ``jobs.py``, ``conversations.py``: avatars in an object store, durable render jobs
  on a work-queue stream, conversation histories in a key-value bucket.
- ``node.py``: all of it wired into one media node.

Nothing here is imported unless ``[cluster] url`` is set: one machine alone never needs NATS.
"""
