"""Activation data for SAEs: corpora, harvesting a model's sites, the on-disk store, training sources.

    docs (sae.data.corpus) --sae.data.contexts.encode_documents--> context rows (tokens, roles, turns, doc ids)
      --batch_contexts--> ContextBatch [B, T] (left padded, attention mask, token keep mask)
      --sae.data.harvest.harvest--> ActivationBatch (kept tokens: acts[(site, layer)] [n, D] + metadata)
      --ShuffleBuffer--> shuffled training batches             (streaming: `stream_batches`, `StreamSource`)
      --sae.data.store.harvest_to_store--> ActivationStore     (on disk: `StoreSource`, `StoreStackSource`)

Modules: corpus (ShareGPT and local files), contexts (tokenisation into fixed-length contexts, token filters),
harvest (the jitted capture forward, shuffling), store (chunked resumable store), sources (training batch
iterators with exact cursors, also over in-memory arrays). Nothing here imports jax at module import.
"""

from sae.data.contexts import (ActivationError, ContextBatch, ContextRow, Encoded, MODES, ROLE_ASSISTANT,
                               ROLE_NAMES, ROLE_PAD, ROLE_SYSTEM, ROLE_TEMPLATE, ROLE_TEXT, ROLE_USER,
                               TURN_AFTER, TURN_DEFAULT_SYSTEM, TURN_PAD, TokenFilter, batch_contexts,
                               default_encoder, encode_documents, role_id)
from sae.data.harvest import (ActivationBatch, META_DTYPES, META_FIELDS, NonFiniteActivationError,
                              ShuffleBuffer, harvest, make_capture_step, site_key, stream_batches,
                              truncated_model)
from sae.data.store import (ActivationStore, ChunkError, STORE_DTYPES, STORE_FORMAT, STORE_VERSION,
                            VERIFY_MODES, harvest_to_store)
from sae.data.sources import StoreSource, StreamSource, StreamStackSource
