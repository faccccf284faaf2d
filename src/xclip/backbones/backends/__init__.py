"""Backend modules: each registers one `xclip.backbones.registry.Backend` (its spec scheme and
loader) at import; `xclip.backbones.registry.BACKEND_MODULES` lists them."""
