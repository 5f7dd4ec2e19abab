pub struct ThreadLocalAllocator; pub struct ThreadLocalConfig;
