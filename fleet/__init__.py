"""Federated training on Flower: a fleet of devices trains one bundle together.

Device side (numpy + engine + flwr; never torch). The server sends each sampled client the
units it assigns and their weights; the client trains them on its own data with
edgeprop.trainer and returns the weights, BatchNorm statistics, its sample count and
metrics; the server averages each unit over the clients that trained it (Flower's
strategies), evaluates, and checkpoints the global state atomically every round.

    partition   split one data set among simulated clients (iid, dirichlet:ALPHA, shard:K)
    assign      which units each sampled client trains (all, blocks:K, by-memory)
    records     unit state <-> Flower ArrayRecords
    client      the ClientApp
    server      the ServerApp: strategy, round loop, evaluation, checkpoint and resume
    simulate    Flower's simulation engine over partitions of one data set
    app         write a Flower App folder for flower-superlink / flower-supernode / flwr run
"""
import os

# Nothing leaves the fleet: Flower's usage telemetry is off wherever edgeprop.fleet is imported.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
