"""The span protocol, shared by clients and servers.

``protocol`` declares every RPC (its handle name, its transport and the messages it carries);
``inputs`` packs and unpacks what a call into a span carries; ``parts`` splits, joins and reads
the multi-part messages of stream RPCs; ``replies`` turns errors into typed replies and back;
``calls``, ``train``, ``stage`` and ``inference`` are the client halves. Servers implement the handlers
(``stamen/server``); clients and servers both import this package and never each other.
"""
