"""Device profiles (data files: RAM, flash, arch, cores, engines). Empty until the memory-budget work lands."""
