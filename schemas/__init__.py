"""Message types shared by every producer and consumer: the OpenAI wire types and the internal job messages."""
