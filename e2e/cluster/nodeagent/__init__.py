"""The local node agent: a stand-in for the kubelet that runs pods as local processes."""
