"""Optional integrations with other serving systems (each needs its own extra).

- ``carpool.integrations.ray_serve``: carpool replicas under Ray Serve (``carpool[ray]``).
"""
