"""The seed's client/server example, as written, with `import torch_parallel as parallel`."""

import torch_parallel as parallel

# Create a server
server = parallel.server("127.0.0.1", 0)
# Create a client and connect to the server
client = parallel.client("127.0.0.1", server.port)
# Say hello
client.send("hi")
# Listen for any client to say something
msg = server.recv_any()
assert msg == "hi"
print(f"server received {msg!r} over {client.link}")
# Disconnect and shutdown
client.close()
server.close()
