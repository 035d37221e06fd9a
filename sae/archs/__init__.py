"""SAE architectures: one module per architecture (relu, topk, batchtopk, jumprelu, matryoshka), each defining
its training forward, inference activation and export mapping as an `Architecture`; `registry` names them."""
