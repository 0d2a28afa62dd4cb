"""Data and tensor parallelism for every decoding method: meshes, partition rules, placement.

See `rules.py` for what is split where, `place.py` for putting models/caches/batches on a mesh and
`multihost.py` for running one program over several hosts.
"""

from jax_specens.parallel.decoding import decode, on_mesh, place_for_decode
from jax_specens.parallel.mesh import (AXES, DATA, MODEL, device_ids, make_mesh, mesh_from_spec,
                                       parse_mesh, submeshes)
from jax_specens.parallel.multihost import global_batch, initialize, to_host
from jax_specens.parallel.place import (check_models, constrain_cache, load_model,
                                        model_shardings, shard_batch, shard_cache, shard_model,
                                        shard_models)
from jax_specens.parallel.rules import ShardingPlan, batch_spec, cache_spec, make_plan, param_specs
