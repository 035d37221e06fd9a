"""Studies on the persona method library (`psm_jax.persona`): one package per study on one contract (`experiments.study`)."""
