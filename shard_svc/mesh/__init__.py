"""The allreduce mesh: how tensor-parallel ranks add their partial sums.

Glossary (one vocabulary across cpumesh):

| term        | meaning                                                                      |
|-------------|------------------------------------------------------------------------------|
| tp_size     | number of tensor-parallel ranks in the group (one shard process each), 1..16 |
| tp_rank     | this shard's index in the group, 0 … tp_size-1                               |
| peers       | "host:port" mesh address of every rank, indexed by tp_rank (ours included)   |
| partial     | a rank's contribution, the tensor handed to `all_reduce`                     |
| allreduce   | every rank ends with the sum of all partials, bitwise identical              |
| fingerprint | a string naming the model and plan; every rank must present the same one     |
| formation   | one successful handshake of all ranks; its id is in every message            |
| seq         | a collective's number within a formation; in every message                   |
| step        | a message's index within one collective                                      |
| direct      | every rank sends its partial to every other, then sums all in rank order     |
| scatter     | reduce-scatter then all-gather, each one direct exchange; chunk c is summed  |
|             | in rank order by its owner, rank c                                           |
| ring        | reduce-scatter then all-gather around the ring, chunk c owned by rank c      |
| transport   | how DATA travels: shm (one host), tcp (plain sockets), zmq or ipc (ZeroMQ);  |
|             | control always uses ZeroMQ                                                   |

Modules:

| module        | holds                                                                      |
|---------------|----------------------------------------------------------------------------|
| communicator  | the `Communicator` protocol, `MeshError`, single-rank and in-process groups |
| group         | `MeshGroup`: the mesh between processes (forms, reduces, aborts, re-forms)  |
| config        | `MeshConfig`, validated once                                               |
| wire          | the 32-byte header and control messages                                    |
| hello         | HELLO: who a rank says it is, and the one judgement of it (`refusal`)      |
| handshake     | forming: HELLO / READY, one formation id                                   |
| links         | the ZeroMQ control sockets (PULL, PUSH per peer, monitors), CURVE keys     |
| inbox         | receiving DATA and control on the ZeroMQ path; strangers' HELLOs ignored   |
| passing       | collectives by message passing (zmq, ipc, tcp): algorithm choice, swap     |
| tcp, tcp_open | the plain-TCP data path and opening it                                     |
| direct        | the lean decode-size allreduce on the tcp path                             |
| shm           | the shared-memory data path (one host)                                     |
| algorithms    | direct, scatter and ring over message passing                              |
"""
