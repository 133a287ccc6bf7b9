"""Operator tools: the client, `cpumesh generate|chat`, `cpumesh local` (a whole cluster on one
machine), `cpumesh loadtest` and `cpumesh k8s`. They talk to the services only through the protos
and their command lines; no service imports them."""
