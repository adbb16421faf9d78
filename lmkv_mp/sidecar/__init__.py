"""Code that runs only in the ``lmkv-sidecar`` process: the loop and its handlers, startup,
client state, access control, metrics, the chunk index and the lower tiers. Nothing here is
imported by an engine process (``lmkv_mp.engine``, ``lmkv_mp.integration``)."""
