"""The Sitewarden controller: the control plane service (registry, TUF repository, rollouts, witness)."""
