"""Driver scripts that run official EnSync clients in a subprocess.

They are executed as scripts (``python p_grpc.py ...``), never imported by the
test process: the official clients' generated protobuf modules register the
same symbols as ours in the global descriptor pool.
"""
