"""The Sitewarden agent: sync, serve, guard, audit at a site."""
