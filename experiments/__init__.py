"""Studies on the persona method library (`psm_jax.persona`): one module per study on one contract (`experiments.study`)."""
