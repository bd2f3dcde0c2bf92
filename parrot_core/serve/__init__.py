"""The serve layer: `ServeCore` (sessions, engines, contexts), the chain executor and the
global scheduler. It knows engines only through `parrot_core.engines.base`."""
